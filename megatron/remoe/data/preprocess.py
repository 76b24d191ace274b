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

Reading the inputs lives in readers.py, checking and opening the written datasets in indexed.py.
``megatron.core`` is imported lazily: it takes seconds to import, and spawned tokenizer workers
(and CLI error paths) do not need it.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from megatron.remoe.data.errors import DataError
from megatron.remoe.data.indexed import SIDECAR_SUFFIX, SIDECAR_VERSION
from megatron.remoe.data.readers import TEXT_MODES, read_documents, resolve_inputs
from megatron.remoe.data.tokenizer import Tokenizer


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
    from megatron.core.datasets.indexed_dataset import DType  # noqa: PLC0415 -- not in tokenizer workers

    return DType.optimal_dtype(vocab_size)


def _tmp_prefix(prefix: str) -> str:
    head, tail = os.path.split(prefix)
    return os.path.join(head, f".{tail}.tmp{os.getpid()}")


def _write_one(job: PreprocessJob, tokenizer: Tokenizer, config: PreprocessConfig,
               encoder: _ChunkEncoder, tmp: str, dtype: type) -> DatasetInfo:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: PLC0415 -- not in workers

    inputs = resolve_inputs(job.inputs)
    total = sum(os.path.getsize(p) for p in inputs if os.path.isfile(p)) or None
    progress = _Progress(job.label or job.domain, total, config.progress)
    docs = (d for path in inputs
            for d in read_documents(path, config.json_key, config.text_mode, config.hf_split))
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
