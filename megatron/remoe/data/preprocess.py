"""Text -> Megatron indexed datasets (``.bin``/``.idx``) plus a sidecar ``.meta.json``.

Inputs (detected by name):
  * ``*.jsonl`` / ``*.json`` (one JSON object per line, text under ``json_key``), optionally ``.gz``
  * ``*.txt`` / ``*.md`` / ``*.text`` (``text_mode="file"``: the whole file is one document;
    ``"paragraph"``: every blank-line separated paragraph is one document), optionally ``.gz``
  * ``*.parquet`` (column ``json_key``; needs pyarrow)
  * a directory written by ``datasets.Dataset.save_to_disk`` or ``hf:NAME[:CONFIG]`` (needs the
    ``datasets`` package; column ``json_key``, split ``hf_split``)
  * any other directory: every supported file below it, in sorted order; globs are expanded sorted.

Guarantees:
  * the output is byte-identical for any number of workers (documents keep input order);
  * nothing is left at the output prefixes unless every job succeeded (temp names, renamed last);
  * ``<prefix>.meta.json`` records the tokenizer fingerprint, document and token counts and the
    domain, so :func:`load_indexed_dataset` can refuse data tokenized with another vocabulary.

``megatron.core`` is imported lazily: it takes seconds to import, and spawned tokenizer workers
(and CLI error paths) do not need it.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import multiprocessing as mp
import os
import re
import struct
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from megatron.remoe.data.errors import DataError
from megatron.remoe.data.tokenizer import Tokenizer

SIDECAR_SUFFIX = ".meta.json"
SIDECAR_VERSION = 1
JSONL_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_EXTS = (".txt", ".md", ".text", ".txt.gz")
PARQUET_EXTS = (".parquet",)
SUPPORTED_EXTS = JSONL_EXTS + TEXT_EXTS + PARQUET_EXTS
TEXT_MODES = ("file", "paragraph")

# Megatron .idx layout: magic(9) version(<Q) dtype(<B) sequence_count(<Q) document_count(<Q).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_NP_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                   6: np.float64, 7: np.float32, 8: np.uint16}


@dataclass
class PreprocessConfig:
    json_key: str = "text"
    text_mode: str = "file"
    append_eod: bool = False
    workers: int = 1
    # A task sent to a worker ends at chunk_docs documents or chunk_chars characters: big enough
    # to amortise IPC, small enough that a few huge documents still spread over the workers.
    chunk_docs: int = 256
    chunk_chars: int = 200_000
    hf_split: str = "train"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise DataError(f"text_mode={self.text_mode!r} is not one of {TEXT_MODES}")
        if self.workers < 1:
            raise DataError(f"workers={self.workers} must be >= 1")


@dataclass
class PreprocessJob:
    """All ``inputs`` are concatenated (in order) into one dataset at ``output_prefix``."""

    domain: str
    inputs: list[str]
    output_prefix: str
    metadata: dict = field(default_factory=dict)  # copied into the sidecar (e.g. source hashes)
    label: str | None = None  # shown in progress lines (default: domain)


@dataclass
class DatasetInfo:
    """Content of ``<prefix>.meta.json``."""

    domain: str
    documents: int
    tokens: int
    dtype: str
    append_eod: bool
    tokenizer: dict
    inputs: list[str]
    bin_bytes: int
    idx_bytes: int
    seconds: float
    metadata: dict = field(default_factory=dict)
    format_version: int = SIDECAR_VERSION

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.tokenizer["fingerprint"]


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------
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
        import pyarrow.parquet as pq
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
        import datasets
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


def read_documents(path: str, config: PreprocessConfig) -> Iterator[str]:
    """Yield the documents of one resolved input, in file order (empty documents skipped)."""
    if path.startswith("hf:") or _is_hf_disk_dataset(path):
        docs = _iter_hf(path, config.json_key, config.hf_split)
    elif _has_ext(path, JSONL_EXTS):
        docs = _iter_jsonl(path, config.json_key)
    elif _has_ext(path, PARQUET_EXTS):
        docs = _iter_parquet(path, config.json_key)
    else:
        docs = _iter_text(path, config.text_mode)
    return (d for d in docs if d)


# ---------------------------------------------------------------------------------------------
# Tokenizing (optionally in worker processes)
# ---------------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_EOD: int | None = None


def _init_worker(tokenizer_payload: str, eod: int | None) -> None:
    global _WORKER_TOKENIZER, _WORKER_EOD
    _WORKER_TOKENIZER = Tokenizer.from_json_str(tokenizer_payload)
    _WORKER_EOD = eod


def _encode_chunk(texts: list[str], tokenizer: Tokenizer | None = None,
                  eod: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode a chunk of documents -> (concatenated ids, per-document lengths).

    One ``encode`` per document (single-threaded), so N workers use N cores and the result does
    not depend on how documents are grouped into chunks. numpy arrays pickle far faster than
    lists of Python ints on the way back to the writer.
    """
    tok = tokenizer or _WORKER_TOKENIZER
    eod = eod if tokenizer is not None else _WORKER_EOD
    docs = [tok.encode(t) for t in texts]
    if eod is not None:
        for ids in docs:
            ids.append(eod)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _chunks(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for t in texts:
        chunk.append(t)
        chars += len(t)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _ChunkEncoder:
    """Encodes chunks of documents in order, in-process or with a pool of worker processes.

    One pool serves every job of a :func:`preprocess` call (spawning costs ~0.3 s per worker).
    """

    def __init__(self, tokenizer: Tokenizer, eod: int | None, workers: int) -> None:
        self.tokenizer, self.eod, self.workers = tokenizer, eod, workers
        self.pool = None

    def __enter__(self) -> "_ChunkEncoder":
        if self.workers > 1:
            # "spawn": forking a parent that already ran the Rust thread pool (or imported
            # torch) can deadlock; spawned workers import only `tokenizers` and numpy.
            ctx = mp.get_context("spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker,
                                 initargs=(self.tokenizer.to_json_str(), self.eod))
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()

    def encode(self, chunks: Iterable[list[str]]) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """Yield (texts, ids, lengths) per chunk, in input order."""
        if self.pool is None:
            for chunk in chunks:
                yield (chunk, *_encode_chunk(chunk, self.tokenizer, self.eod))
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= 2 * self.workers:  # bounded read-ahead keeps memory flat
                texts, res = pending.popleft()
                yield (texts, *res.get())
        while pending:
            texts, res = pending.popleft()
            yield (texts, *res.get())


class _Progress:
    """A one-line progress display on stderr (rewritten in place on a terminal)."""

    def __init__(self, label: str, total_bytes: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total_bytes, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.docs = self.tokens = self.chars = 0

    def update(self, docs: int, tokens: int, chars: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.chars += chars
        now = time.perf_counter()
        if self.tty and now - self.last > 0.2:
            self.last = now
            pct = f"{min(99.9, 100 * self.chars / self.total):5.1f}% | " if self.total else ""
            rate = self.tokens / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r[{self.label}] {pct}{self.docs:,} docs | {self.tokens:,} tokens | "
                             f"{rate:,.0f} tok/s ")
            sys.stderr.flush()

    def close(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            rate = self.tokens / max(elapsed, 1e-9)
            sys.stderr.write(f"{chr(13) if self.tty else ''}[{self.label}] {self.docs:,} docs, "
                             f"{self.tokens:,} tokens in {elapsed:.2f} s ({rate:,.0f} tokens/s)\n")
            sys.stderr.flush()
        return elapsed


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (as Megatron's own preprocess_data.py picks), else int32."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def sidecar_path(prefix: str) -> str:
    return prefix + SIDECAR_SUFFIX


def _tmp_prefix(prefix: str) -> str:
    head, tail = os.path.split(prefix)
    return os.path.join(head, f".{tail}.tmp{os.getpid()}")


def _outputs(prefix: str) -> list[str]:
    return [prefix + ".bin", prefix + ".idx", sidecar_path(prefix)]


def _write_one(job: PreprocessJob, tokenizer: Tokenizer, config: PreprocessConfig,
               encoder: _ChunkEncoder, tmp: str, dtype: type) -> DatasetInfo:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    inputs = resolve_inputs(job.inputs)
    total = sum(os.path.getsize(p) for p in inputs if os.path.isfile(p)) or None
    progress = _Progress(job.label or job.domain, total, config.progress)
    docs = (d for path in inputs for d in read_documents(path, config))
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        for texts, flat, lengths in encoder.encode(_chunks(docs, config.chunk_docs, config.chunk_chars)):
            if flat.size and int(flat.max()) > np.iinfo(dtype).max:
                raise DataError(f"token id {int(flat.max())} does not fit {dtype.__name__}")
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i, n in enumerate(lengths.tolist()):
                builder.add_document(flat[offsets[i]:offsets[i + 1]], [n])
            # Characters approximate the input bytes well enough for a percentage.
            progress.update(len(lengths), int(flat.size), sum(len(t) for t in texts))
    finally:
        builder.data_file.close()  # finalize() closes it too; an error must not leak the handle
    if progress.docs == 0:
        raise DataError(f"inputs {job.inputs} of domain {job.domain!r} contain no documents; "
                        f"fix: check --json-key/--text-mode or the files")
    builder.finalize(tmp + ".idx")
    seconds = progress.close()
    return DatasetInfo(
        domain=job.domain, documents=progress.docs, tokens=progress.tokens,
        dtype=np.dtype(dtype).name, append_eod=config.append_eod, tokenizer=tokenizer.meta(),
        inputs=list(job.inputs), bin_bytes=os.path.getsize(tmp + ".bin"),
        idx_bytes=os.path.getsize(tmp + ".idx"), seconds=round(seconds, 3), metadata=job.metadata)


def preprocess(jobs: Sequence[PreprocessJob], tokenizer: Tokenizer,
               config: PreprocessConfig | None = None) -> list[DatasetInfo]:
    """Tokenize every job into ``<prefix>.bin/.idx/.meta.json``; all-or-nothing.

    Each job is written under temporary names next to its prefix; only when all jobs succeeded
    are they renamed into place, so an error (bad line, interrupt) leaves no partial dataset.
    """
    config = config or PreprocessConfig()
    prefixes = [j.output_prefix for j in jobs]
    if len(set(prefixes)) != len(prefixes):
        raise DataError(f"two jobs write the same output prefix: {prefixes}")
    for job in jobs:  # fail fast, before any tokenization, on missing/empty inputs
        resolve_inputs(job.inputs)
    dtype = token_dtype(tokenizer.vocab_size)
    created_dirs: list[str] = []
    temps: list[tuple[str, str, DatasetInfo]] = []
    done = False
    start = time.perf_counter()
    encoder = _ChunkEncoder(tokenizer, tokenizer.eod if config.append_eod else None, config.workers)
    try:
        with encoder:
            for job in jobs:
                out_dir = os.path.dirname(os.path.abspath(job.output_prefix))
                if not os.path.isdir(out_dir):
                    _makedirs_tracked(out_dir, created_dirs)
                tmp = _tmp_prefix(job.output_prefix)
                temps.append((tmp, job.output_prefix, None))
                info = _write_one(job, tokenizer, config, encoder, tmp, dtype)
                temps[-1] = (tmp, job.output_prefix, info)
        for tmp, prefix, info in temps:
            with open(tmp + SIDECAR_SUFFIX, "w", encoding="utf-8") as f:
                json.dump(asdict(info), f, indent=2, sort_keys=True)
                f.write("\n")
        # Rename last; the sidecar goes last of all so that its presence marks a complete set.
        for tmp, prefix, _ in temps:
            for suffix in (".bin", ".idx", SIDECAR_SUFFIX):
                os.replace(tmp + suffix, prefix + suffix)
        done = True
    finally:
        if not done:
            for tmp, _, _ in temps:
                for suffix in (".bin", ".idx", SIDECAR_SUFFIX):
                    _remove_quietly(tmp + suffix)
            for d in reversed(created_dirs):
                try:
                    os.rmdir(d)  # only if still empty
                except OSError:
                    pass
    infos = [info for _, _, info in temps]
    if config.progress and len(jobs) > 1:
        tokens = sum(i.tokens for i in infos)
        elapsed = time.perf_counter() - start
        sys.stderr.write(f"[total] {sum(i.documents for i in infos):,} docs, {tokens:,} tokens in "
                         f"{elapsed:.2f} s ({tokens / max(elapsed, 1e-9):,.0f} tokens/s)\n")
    return infos


def preprocess_files(inputs: Sequence[str], output_prefix: str, tokenizer: Tokenizer,
                     config: PreprocessConfig | None = None, domain: str | None = None,
                     metadata: dict | None = None) -> DatasetInfo:
    """Single-prefix convenience wrapper around :func:`preprocess`."""
    domain = domain or os.path.basename(output_prefix)
    job = PreprocessJob(domain, list(inputs), output_prefix, dict(metadata or {}))
    return preprocess([job], tokenizer, config)[0]


def _makedirs_tracked(path: str, created: list[str]) -> None:
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d)
        created.append(d)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_sidecar(prefix: str) -> dict | None:
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix: re-run preprocessing") from None


def check_indexed_files(prefix: str) -> tuple[int, int]:
    """Check ``.bin``/``.idx`` exist and have exactly the sizes the index implies.

    Returns (documents, tokens). Megatron itself would only fail later with an assert or a
    mmap error deep inside training; this names the file and the fix.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    fix = "fix: re-run tools/preprocess_data.py for this prefix"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; {fix}")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER.size)
    if len(header) < _IDX_HEADER.size:
        raise DataError(f"{idx_path} is truncated ({idx_size} bytes, header alone is "
                        f"{_IDX_HEADER.size}); {fix}")
    magic, version, code, n_seq, n_doc_idx = _IDX_HEADER.unpack(header)
    if magic != _IDX_MAGIC or version != 1 or code not in _NP_DTYPE_CODES:
        raise DataError(f"{idx_path} is not a Megatron index file (bad header); {fix}")
    expected_idx = _IDX_HEADER.size + n_seq * (4 + 8) + n_doc_idx * 8
    # Multimodal indices append one mode byte per sequence.
    if idx_size not in (expected_idx, expected_idx + n_seq):
        what = "truncated" if idx_size < expected_idx else "longer than its header says"
        raise DataError(f"{idx_path} is {what} ({idx_size} bytes, expected {expected_idx}); {fix}")
    itemsize = np.dtype(_NP_DTYPE_CODES[code]).itemsize
    bin_size = os.path.getsize(bin_path)
    if n_seq:
        lengths = np.memmap(idx_path, np.int32, "r", _IDX_HEADER.size, (n_seq,))
        pointers = np.memmap(idx_path, np.int64, "r", _IDX_HEADER.size + 4 * n_seq, (n_seq,))
        _check_index_entries(idx_path, bin_path, bin_size, lengths, pointers, itemsize, fix)
        doc_idx = np.memmap(idx_path, np.int64, "r", _IDX_HEADER.size + 12 * n_seq, (n_doc_idx,))
        if n_doc_idx < 1 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or \
                (n_doc_idx > 1 and bool((np.diff(doc_idx) < 0).any())):
            raise DataError(f"{idx_path} has a corrupt document index (it must rise from 0 to "
                            f"{n_seq} sequences); {fix}")
        tokens = int(lengths.sum(dtype=np.int64))
        expected_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize
        del lengths, pointers, doc_idx
    else:
        tokens, expected_bin = 0, 0
    if bin_size != expected_bin:
        what = "truncated" if bin_size < expected_bin else "longer than its index says"
        raise DataError(f"{bin_path} is {what} ({bin_size} bytes, expected {expected_bin}); {fix}")
    return max(n_doc_idx - 1, 0), tokens


def _check_index_entries(idx_path, bin_path, bin_size, lengths, pointers, itemsize, fix) -> None:
    """Every sequence must start where the previous one ends (Megatron writes them back to back)
    and have a non-negative length; one that does not, or that reaches past the end of the
    .bin, means a corrupt index or one belonging to another .bin. Vectorised over the index
    (a sequential read of the .idx, not of the .bin)."""
    lengths64 = np.asarray(lengths, dtype=np.int64)
    ends = np.asarray(pointers, dtype=np.int64) + lengths64 * itemsize
    starts_ok = np.empty(len(ends), dtype=bool)
    starts_ok[0] = pointers[0] == 0
    starts_ok[1:] = np.asarray(pointers[1:]) == ends[:-1]
    bad = np.flatnonzero(~starts_ok | (lengths64 < 0))
    if bad.size:
        i = int(bad[0])
        start, end = int(pointers[i]), int(ends[i])
        where = (f"points past the end of {bin_path} ({bin_size} bytes)" if end > bin_size else
                 f"does not start where sequence {i - 1} ends" if i else "does not start at 0")
        raise DataError(f"{idx_path} is corrupt: sequence {i} (bytes {start}..{end}) {where}; "
                        f"{fix}")


def check_token_ids(prefix: str, vocab_size: int, full: bool = False,
                    scan_limit_bytes: int = 256 << 20, samples: int = 64,
                    sample_bytes: int = 1 << 20) -> None:
    """DataError if ``prefix.bin`` holds a token id outside [0, vocab_size).

    Reads the whole .bin when ``full`` or when it is at most ``scan_limit_bytes``, otherwise
    ``samples`` evenly spaced blocks of ``sample_bytes`` (cheap, catches data made with another,
    larger vocabulary; a lone bad id in a big file needs ``full``)."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    with open(idx_path, "rb") as f:
        code = _IDX_HEADER.unpack(f.read(_IDX_HEADER.size))[2]
    dtype = np.dtype(_NP_DTYPE_CODES[code])
    count = os.path.getsize(bin_path) // dtype.itemsize
    if not count:
        return
    tokens = np.memmap(bin_path, dtype, "r", 0, (count,))
    block = max(sample_bytes // dtype.itemsize, 1)
    if full or count * dtype.itemsize <= scan_limit_bytes:
        starts = range(0, count, 1 << 24)
        block = 1 << 24
    else:
        starts = np.linspace(0, count - block, samples).astype(np.int64)
    for start in starts:
        chunk = np.asarray(tokens[int(start):int(start) + block])
        bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
        if bad.size:
            position = int(start) + int(bad[0])
            raise DataError(
                f"{bin_path} holds token id {int(chunk[bad[0]])} (token {position}), outside the "
                f"vocabulary of {vocab_size} tokens of this run; fix: re-run "
                "tools/preprocess_data.py with this run's tokenizer, or pass the tokenizer the "
                "data was made with")
    del tokens


def check_tokenizer_match(prefix: str, tokenizer: Tokenizer, meta: dict | None = None) -> None:
    meta = meta if meta is not None else read_sidecar(prefix)
    if meta is None:
        return  # e.g. data from Megatron-LM's own preprocess_data.py: nothing to compare
    want = meta.get("tokenizer", {})
    if want.get("fingerprint") != tokenizer.fingerprint():
        raise DataError(
            f"{prefix}: tokenizer mismatch: the data was tokenized with {want.get('name')!r} "
            f"(fingerprint {want.get('fingerprint')}, vocab {want.get('vocab_size')}) but the "
            f"tokenizer is {tokenizer.name!r} (fingerprint {tokenizer.fingerprint()}, vocab "
            f"{tokenizer.vocab_size}); fix: use the same tokenizer or re-run preprocessing with it")


def load_indexed_dataset(prefix: str, tokenizer: Tokenizer | None = None):
    """Open ``prefix`` as a ``megatron.core`` ``IndexedDataset`` after integrity checks.

    Raises :class:`DataError` if ``.bin``/``.idx`` are missing or truncated, or if ``tokenizer``
    is given and its fingerprint differs from the one recorded in ``<prefix>.meta.json``.
    """
    check_indexed_files(prefix)
    if tokenizer is not None:
        check_tokenizer_match(prefix, tokenizer)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)
