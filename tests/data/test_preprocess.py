"""Preprocessing into Megatron indexed datasets: round trip, determinism, errors, no partial output."""

import filecmp
import gzip
import importlib.util
import json
import os
import sysconfig

import numpy as np
import pytest

from megatron.remoe.data.errors import DataError
from megatron.remoe.data.indexed import check_indexed_files, load_indexed_dataset, read_sidecar
from megatron.remoe.data.preprocess import PreprocessConfig, preprocess_files
from megatron.remoe.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from tests.helpers.paths import ROOT

STDLIB = sysconfig.get_paths()["stdlib"]
STDLIB_FILES = ["argparse.py", "textwrap.py", "shlex.py", "fractions.py", "string.py",
                "bisect.py", "colorsys.py", "glob.py", "heapq.py", "keyword.py", "operator.py"]


def _cli():
    spec = importlib.util.spec_from_file_location("preprocess_data_cli",
                                                  os.path.join(ROOT, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stdlib_docs():
    docs = []
    for name in STDLIB_FILES:
        with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
            docs.append(f.read())
    from pydoc_data.topics import topics
    docs += [topics[k] for k in sorted(topics)[:40]]
    return docs


@pytest.fixture(scope="module")
def docs():
    return stdlib_docs()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe(docs):
    return train_bpe_tokenizer(docs, 2000)


def quiet(**kw):
    return PreprocessConfig(progress=False, **kw)


def listing(path):
    return sorted(os.listdir(path))


def test_round_trip_matches_encode(tmp_path, jsonl, docs, gpt2):
    prefix = str(tmp_path / "out" / "ds")
    info = preprocess_files([jsonl], prefix, gpt2, quiet(append_eod=True), domain="stdlib")
    ds = load_indexed_dataset(prefix, gpt2)
    assert len(ds) == len(docs) == info.documents
    for i, text in enumerate(docs):
        assert ds[i].tolist() == gpt2.encode(text) + [gpt2.eod]
    assert ds[0].dtype == np.uint16
    meta = read_sidecar(prefix)
    assert meta["tokenizer"]["fingerprint"] == gpt2.fingerprint()
    assert meta["documents"] == len(docs) and meta["domain"] == "stdlib"
    assert meta["tokens"] == sum(len(gpt2.encode(t)) + 1 for t in docs)
    assert check_indexed_files(prefix) == (len(docs), meta["tokens"])
    assert listing(tmp_path / "out") == ["ds.bin", "ds.idx", "ds.meta.json"]


def test_without_eod_and_text_inputs(tmp_path, bpe):
    a = tmp_path / "a.txt"
    a.write_text("first paragraph\nstill first\n\n  \nsecond paragraph\n\n\nthird\n", encoding="utf-8")
    b = tmp_path / "b.txt.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write("gzipped doc")
    prefix = str(tmp_path / "para")
    preprocess_files([str(a), str(b)], prefix, bpe, quiet(text_mode="paragraph"))
    ds = load_indexed_dataset(prefix, bpe)
    expected = ["first paragraph\nstill first", "second paragraph", "third\n", "gzipped doc"]
    assert [bpe.decode(ds[i]) for i in range(len(ds))] == expected
    prefix = str(tmp_path / "whole")
    preprocess_files([str(a)], prefix, bpe, quiet(text_mode="file"))
    assert len(load_indexed_dataset(prefix)) == 1


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_output_independent_of_worker_count(tmp_path, jsonl, bpe):
    outs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        # Small chunks so that two workers really interleave.
        preprocess_files([jsonl], prefix, bpe, quiet(append_eod=True, workers=workers,
                                                     chunk_docs=3, chunk_chars=5000))
        outs.append(prefix)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(outs[0] + suffix, outs[1] + suffix, shallow=False)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_multi_domain_cli(tmp_path, jsonl):
    txt = tmp_path / "t.txt"
    txt.write_text("some plain text", encoding="utf-8")
    rc = _cli().main(["--input", f"code={jsonl}", f"prose={txt}", "--output-prefix",
                      str(tmp_path / "mix"), "--append-eod", "--workers", "2", "--quiet"])
    assert rc == 0
    assert read_sidecar(str(tmp_path / "mix_code"))["domain"] == "code"
    assert read_sidecar(str(tmp_path / "mix_prose"))["documents"] == 1


# --------------------------------------------------------------------------------------------
# Errors: one line naming the fix, exit 2 from the CLI, nothing left behind.
# --------------------------------------------------------------------------------------------
def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = {
    "missing": (None, "does not exist"),
    "empty": (b"", "is empty"),
    "wrong_key": (b'{"text": "ok"}\n{"body": "x", "id": 3}\n', r"json key 'text' not found \(keys found: \['body', 'id'\]\)"),  # noqa: E501
    "bad_utf8_jsonl": (b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n', r"bad_utf8_jsonl.jsonl:3: invalid UTF-8"),
    "bad_json": (b'{"text": "ok"}\n{"text": \n', r":2: invalid JSON"),
    "not_string": (b'{"text": 5}\n', r"value of 'text' is int"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_bad_inputs_cli(tmp_path, capsys, jsonl, case, workers):
    content, pattern = BAD_INPUTS[case]
    path = str(tmp_path / f"{case}.jsonl")
    if content is not None:
        _write(tmp_path / f"{case}.jsonl", content)
    out_dir = tmp_path / "out"
    # A good input first: its finished dataset must not survive the failure of the second.
    rc = _cli().main(["--input", f"good={jsonl}", f"bad={path}", "--output-prefix",
                      str(out_dir / "sub" / "x"), "--workers", str(workers), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    import re
    assert re.search(pattern, err), err
    assert not out_dir.exists()


def test_bad_utf8_text_line_number(tmp_path, bpe):
    path = _write(tmp_path / "bad.txt", b"line one\nline two\n\nline \xff four\n")
    with pytest.raises(DataError, match=r"bad.txt:4: invalid UTF-8"):
        preprocess_files([path], str(tmp_path / "x"), bpe, quiet())
    assert listing(tmp_path) == ["bad.txt"]


def test_no_documents_and_bad_extension(tmp_path, bpe):
    blank = _write(tmp_path / "blank.jsonl", b"\n\n")
    with pytest.raises(DataError, match="contain no documents"):
        preprocess_files([blank], str(tmp_path / "x"), bpe, quiet())
    csv = _write(tmp_path / "data.csv", b"a,b\n")
    with pytest.raises(DataError, match="unsupported extension"):
        preprocess_files([csv], str(tmp_path / "x"), bpe, quiet())
    assert listing(tmp_path) == ["blank.jsonl", "data.csv"]


@pytest.fixture()
def small_dataset(tmp_path, jsonl, bpe):
    prefix = str(tmp_path / "ds")
    preprocess_files([jsonl], prefix, bpe, quiet(append_eod=True))
    return prefix


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_truncated_files(small_dataset, suffix, bpe):
    path = small_dataset + suffix
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DataError, match=rf"ds\{suffix} is truncated .*fix: re-run"):
        load_indexed_dataset(small_dataset, bpe)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="truncated"):
        load_indexed_dataset(small_dataset)


def test_missing_files(small_dataset):
    os.remove(small_dataset + ".bin")
    with pytest.raises(DataError, match=r"ds\.bin not found"):
        load_indexed_dataset(small_dataset)


def test_tokenizer_mismatch(small_dataset, bpe, gpt2, docs):
    with pytest.raises(DataError, match=rf"tokenizer mismatch.*'bpe-2000' \(fingerprint {bpe.fingerprint()}.*'gpt2' \(fingerprint {gpt2.fingerprint()}"):  # noqa: E501
        load_indexed_dataset(small_dataset, gpt2)
    # the tokenizer that wrote it loads it: every document, the first one as written (+ EOD)
    ds = load_indexed_dataset(small_dataset, bpe)
    assert len(ds) == len(docs)
    assert ds[0].tolist() == bpe.encode(docs[0]) + [bpe.eod]


def test_megatron_gpt_dataset_reads_output(small_dataset, bpe):
    """The files feed megatron.core's GPTDataset unchanged."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    config = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([small_dataset], None),
                              split="100,0,0", tokenizer=bpe, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=None, mmap_bin_files=True)
    indexed = IndexedDataset(small_dataset)
    ds = GPTDataset(indexed, "train", np.arange(len(indexed), dtype=np.int32), 4, Split.train, config)
    sample = ds[0]
    assert sample["tokens"].shape[0] == 64


def test_parquet_input(tmp_path, bpe, docs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"content": docs[:5], "n": list(range(5))}), path)
    with pytest.raises(DataError, match=r"column 'text' not found .*fix: --json-key content"):
        preprocess_files([path], str(tmp_path / "x"), bpe, quiet())
    preprocess_files([path], str(tmp_path / "x"), bpe, quiet(json_key="content"))
    ds = load_indexed_dataset(str(tmp_path / "x"), bpe)
    assert [ds[i].tolist() for i in range(5)] == [bpe.encode(t) for t in docs[:5]]


def test_hf_dataset_on_disk(tmp_path, bpe, docs):
    datasets = pytest.importorskip("datasets")
    path = str(tmp_path / "hf")
    datasets.Dataset.from_dict({"text": docs[:4]}).save_to_disk(path)
    preprocess_files([path], str(tmp_path / "x"), bpe, quiet())
    ds = load_indexed_dataset(str(tmp_path / "x"), bpe)
    assert [ds[i].tolist() for i in range(4)] == [bpe.encode(t) for t in docs[:4]]
