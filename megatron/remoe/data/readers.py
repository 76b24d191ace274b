"""Reading documents for preprocessing: JSONL, text, parquet files, HF datasets (on disk or
`hf:NAME`), directories and globs (in sorted order), one document at a time."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from typing import Iterable, Iterator, Sequence

from megatron.remoe.data.errors import DataError

JSONL_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")

TEXT_EXTS = (".txt", ".md", ".text", ".txt.gz")


PARQUET_EXTS = (".parquet",)


SUPPORTED_EXTS = JSONL_EXTS + TEXT_EXTS + PARQUET_EXTS


TEXT_MODES = ("file", "paragraph")


def _has_ext(path: str, exts: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(exts))


def _is_hf_disk_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def resolve_inputs(inputs: Iterable[str]) -> list[str]:
    """Expand globs/directories and check every input exists and is non-empty (fail fast)."""
    resolved: list[str] = []
    for item in inputs:
        if item.startswith("hf:"):
            resolved.append(item)
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not os.path.exists(matches[0]):
            raise DataError(f"input {item!r} does not exist; fix: check the path (or use hf:NAME "
                            f"for a Hugging Face dataset)")
        for path in matches:
            if os.path.isdir(path) and not _is_hf_disk_dataset(path):
                found = sorted(
                    os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                    if _has_ext(f, SUPPORTED_EXTS))
                if not found:
                    raise DataError(f"directory {path!r} has no input files ({', '.join(SUPPORTED_EXTS)})")
                resolved.extend(found)
            else:
                resolved.append(path)
    for path in resolved:
        if path.startswith("hf:") or _is_hf_disk_dataset(path):
            continue
        if not _has_ext(path, SUPPORTED_EXTS):
            raise DataError(f"input {path!r} has an unsupported extension; fix: use one of "
                            f"{', '.join(SUPPORTED_EXTS)} (or a saved HF dataset directory)")
        if os.path.getsize(path) == 0:
            raise DataError(f"input {path!r} is empty (0 bytes); fix: remove it from the inputs")
    return resolved


def _read_bytes_lines(path: str) -> Iterator[bytes]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def _decode(raw: bytes, path: str, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        column = e.start - raw.rfind(b"\n", 0, e.start)  # 1-based byte column
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte column {column}); fix: "
                        f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _suggest_key(keys: Sequence[str]) -> str:
    strings = [k for k in keys if k in ("text", "content", "body", "document", "article")]
    return strings[0] if strings else (keys[0] if keys else "KEY")


def _iter_jsonl(path: str, key: str) -> Iterator[str]:
    for lineno, raw in enumerate(_read_bytes_lines(path), 1):
        line = _decode(raw, path, lineno)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix: write one JSON object "
                            f"per line (JSON Lines)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if key not in obj:
            keys = sorted(obj)
            raise DataError(f"{path}:{lineno}: json key {key!r} not found (keys found: {keys}); "
                            f"fix: --json-key {_suggest_key(keys)}")
        text = obj[key]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: value of {key!r} is {type(text).__name__}, "
                            f"not a string; fix: choose a text field with --json-key")
        yield text


def _iter_text(path: str, mode: str) -> Iterator[str]:
    raw = b"".join(_read_bytes_lines(path))
    text = _decode(raw, path)
    if mode == "file":
        yield text
    else:
        yield from (p for p in re.split(r"\n\s*\n", text) if p.strip())


def _iter_parquet(path: str, key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 -- optional extra
    except ImportError:
        raise DataError(f"reading {path!r} needs pyarrow; fix: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if key not in names:
        raise DataError(f"{path}: column {key!r} not found (columns found: {names}); "
                        f"fix: --json-key {_suggest_key(names)}")
    for batch in pf.iter_batches(columns=[key], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _iter_hf(spec: str, key: str, split: str) -> Iterator[str]:
    try:
        import datasets  # noqa: PLC0415 -- optional extra
    except ImportError:
        raise DataError(f"reading {spec!r} needs the 'datasets' package; fix: pip install datasets") from None
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as e:  # hub/network/format errors: surface them in one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {msg}") from None
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{spec}: split {split!r} not found (splits: {sorted(ds)}); fix: --hf-split")
            ds = ds[split]
    if key not in ds.column_names:
        raise DataError(f"{spec}: column {key!r} not found (columns found: {ds.column_names}); "
                        f"fix: --json-key {_suggest_key(ds.column_names)}")
    for batch in ds.select_columns([key]).iter(batch_size=1024):
        yield from (t for t in batch[key] if t is not None)


def read_documents(path: str, json_key: str = "text", text_mode: str = "file",
                   hf_split: str = "train") -> Iterator[str]:
    """Yield the documents of one resolved input, in file order (empty documents skipped).

    `json_key`: the text field of JSONL records, parquet files and HF datasets; `text_mode`: file
    (a text file is one document) or paragraph (each blank-line separated paragraph is one);
    `hf_split`: the split of an HF dataset."""
    if path.startswith("hf:") or _is_hf_disk_dataset(path):
        docs = _iter_hf(path, json_key, hf_split)
    elif _has_ext(path, JSONL_EXTS):
        docs = _iter_jsonl(path, json_key)
    elif _has_ext(path, PARQUET_EXTS):
        docs = _iter_parquet(path, json_key)
    else:
        docs = _iter_text(path, text_mode)
    return (d for d in docs if d)
