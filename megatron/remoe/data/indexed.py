"""Checking and opening a tokenized dataset (`<prefix>.bin/.idx` + `.meta.json`): sizes against
the index, token ids against the vocabulary, the tokenizer against the sidecar; one-line
DataErrors naming the file and the fix, before megatron-core would fail deep inside training.

``megatron.core`` is imported only to open the dataset (it takes seconds to import)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from megatron.remoe.data.errors import DataError
from megatron.remoe.data.tokenizer import Tokenizer

SIDECAR_SUFFIX = ".meta.json"


SIDECAR_VERSION = 1


# Megatron .idx layout: magic(9) version(<Q) dtype(<B) sequence_count(<Q) document_count(<Q).
_IDX_MAGIC = b"MMIDIDX\x00\x00"


IDX_HEADER = struct.Struct("<9sQBQQ")


_NP_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                   6: np.float64, 7: np.float32, 8: np.uint16}


def sidecar_path(prefix: str) -> str:
    return prefix + SIDECAR_SUFFIX


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
        header = f.read(IDX_HEADER.size)
    if len(header) < IDX_HEADER.size:
        raise DataError(f"{idx_path} is truncated ({idx_size} bytes, header alone is "
                        f"{IDX_HEADER.size}); {fix}")
    magic, version, code, n_seq, n_doc_idx = IDX_HEADER.unpack(header)
    if magic != _IDX_MAGIC or version != 1 or code not in _NP_DTYPE_CODES:
        raise DataError(f"{idx_path} is not a Megatron index file (bad header); {fix}")
    expected_idx = IDX_HEADER.size + n_seq * (4 + 8) + n_doc_idx * 8
    # Multimodal indices append one mode byte per sequence.
    if idx_size not in (expected_idx, expected_idx + n_seq):
        what = "truncated" if idx_size < expected_idx else "longer than its header says"
        raise DataError(f"{idx_path} is {what} ({idx_size} bytes, expected {expected_idx}); {fix}")
    itemsize = np.dtype(_NP_DTYPE_CODES[code]).itemsize
    bin_size = os.path.getsize(bin_path)
    if n_seq:
        lengths = np.memmap(idx_path, np.int32, "r", IDX_HEADER.size, (n_seq,))
        pointers = np.memmap(idx_path, np.int64, "r", IDX_HEADER.size + 4 * n_seq, (n_seq,))
        _check_index_entries(idx_path, bin_path, bin_size, lengths, pointers, itemsize, fix)
        doc_idx = np.memmap(idx_path, np.int64, "r", IDX_HEADER.size + 12 * n_seq, (n_doc_idx,))
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
        code = IDX_HEADER.unpack(f.read(IDX_HEADER.size))[2]
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
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: PLC0415 -- keeps megatron-core out of tokenizer workers and CLI error paths

    return IndexedDataset(prefix)
