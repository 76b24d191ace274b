"""Tokenizers: exact GPT-2 ids, BPE determinism, save/load, fingerprints."""

import os
import sysconfig

import pytest

from megatron.remoe.data.tokenizer import EOD_TOKEN, TokenizerError, load_tokenizer, train_bpe_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]


def stdlib_texts(names=("argparse.py", "textwrap.py", "shlex.py", "fractions.py", "string.py")):
    texts = []
    for name in names:
        with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
            texts.append(f.read())
    from pydoc_data.topics import topics
    texts += [topics[k] for k in sorted(topics)[:20]]
    return texts


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]
    assert gpt2.eod == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.kind == "gpt2" and gpt2.name == "gpt2"
    assert gpt2.decode([50256]) == EOD_TOKEN


def test_gpt2_decode_round_trip_and_batch(gpt2):
    texts = ["Hello world", "naïve café — 日本語 🙂", "def f(x):\n    return x ** 2\n", ""]
    for t in texts:
        assert gpt2.decode(gpt2.encode(t)) == t
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


def test_eod_in_text_is_plain_text(gpt2):
    # Document boundaries come only from --append-eod, never from the text itself.
    ids = gpt2.encode(f"a{EOD_TOKEN}b")
    assert gpt2.eod not in ids
    assert gpt2.decode(ids) == f"a{EOD_TOKEN}b"


def test_gpt2_save_load_same_fingerprint(gpt2, tmp_path):
    gpt2.save(str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again.fingerprint() == gpt2.fingerprint()
    assert again.encode("Hello world") == [15496, 995]
    assert (again.kind, again.eod, again.vocab_size) == ("gpt2", 50256, 50257)


def test_bpe_training_is_deterministic(tmp_path):
    texts = stdlib_texts()
    a = train_bpe_tokenizer(texts, 1000)
    b = train_bpe_tokenizer(list(texts), 1000)
    assert a.vocab_size == 1000
    assert a.eod == 0 and a.eod_token == EOD_TOKEN
    assert a.backend.to_str() == b.backend.to_str()
    assert a.fingerprint() == b.fingerprint()
    sample = texts[0][:2000]
    assert a.decode(a.encode(sample)) == sample
    # A different vocabulary has a different fingerprint.
    c = train_bpe_tokenizer(texts, 900)
    assert c.fingerprint() != a.fingerprint()
    # Save/load round trip keeps ids and fingerprint.
    a.save(str(tmp_path / "bpe"), extra_meta={"trained_on": "x"})
    loaded = load_tokenizer(str(tmp_path / "bpe"))
    assert loaded.fingerprint() == a.fingerprint()
    assert loaded.encode(sample) == a.encode(sample)
    assert (loaded.kind, loaded.name, loaded.eod) == ("bpe", "bpe-1000", 0)


def test_worker_serialisation_round_trip():
    tok = train_bpe_tokenizer(stdlib_texts()[:2], 400)
    from megatron.remoe.data.tokenizer import Tokenizer
    copy = Tokenizer.from_json_str(tok.to_json_str())
    assert copy.fingerprint() == tok.fingerprint()
    assert copy.encode("import os\n") == tok.encode("import os\n")


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="neither 'gpt2' nor a directory"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot parse"):
        load_tokenizer(str(tmp_path / "broken"))
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe_tokenizer(["abc"], 100)
