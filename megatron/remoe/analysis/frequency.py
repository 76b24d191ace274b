"""Token frequency (counted on the training split) and experts per token by frequency-rank bucket:
the paper's Fig. 7."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.analysis.tokens import open_indexed


def token_frequencies(prefixes: Sequence[str], vocab_size: int,
                      max_tokens: Optional[int] = None) -> np.ndarray:
    """Token counts `[vocab_size]` over the given datasets (the training split), read directly
    from the `.bin` files; at most `max_tokens` tokens from each prefix."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for prefix in prefixes:
        ds = open_indexed(prefix)
        data = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
        if max_tokens is not None:
            data = data[:max_tokens]
        c = np.bincount(np.asarray(data, dtype=np.int64), minlength=vocab_size)
        if len(c) > vocab_size:
            raise AnalysisError(f"{prefix} holds token id {len(c) - 1} >= vocabulary size "
                                f"{vocab_size}; wrong tokenizer for this data?")
        counts += c
    return counts



def frequency_ranks(counts: np.ndarray) -> np.ndarray:
    """1-based frequency rank of every token id (1 = most frequent; ties by id; unseen last)."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    ranks = np.empty(len(counts), dtype=np.int64)
    ranks[order] = np.arange(1, len(counts) + 1)
    return ranks


def log_rank_buckets(max_rank: int, num_buckets: int) -> np.ndarray:
    """Bucket edges over ranks 1..max_rank, log-spaced: bucket b = [edges[b], edges[b+1])."""
    edges = np.unique(np.round(np.geomspace(1, max_rank + 1, num_buckets + 1)).astype(np.int64))
    edges[0], edges[-1] = 1, max_rank + 1
    return np.unique(edges)


def experts_by_frequency(routing: np.ndarray, token_ids: np.ndarray, counts: np.ndarray,
                         num_buckets: int = 12) -> dict:
    """Mean experts per token by frequency-rank bucket (the paper's Fig. 7).

    Returns arrays over buckets: rank_lo, rank_hi (inclusive), count_hi/count_lo (training
    frequency of the bucket's most/least frequent token), occurrences (analysed tokens),
    types (distinct analysed token ids), per_layer [buckets, L] and mean (over layers) [buckets];
    NaN where a bucket holds no analysed token. Also `corr`: Pearson correlation over the
    analysed tokens between log(1 + training count) and experts per token (averaged over layers).
    """
    ranks = frequency_ranks(counts)
    edges = log_rank_buckets(len(counts), num_buckets)
    nb = len(edges) - 1
    tok_rank = ranks[token_ids]
    bucket = np.searchsorted(edges, tok_rank, side="right") - 1
    k = routing.sum(axis=2).astype(np.float64)  # [L, N]
    L = routing.shape[0]
    occ = np.bincount(bucket, minlength=nb)[:nb]
    per_layer = np.full((nb, L), np.nan)
    for l in range(L):
        sums = np.bincount(bucket, weights=k[l], minlength=nb)[:nb]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_layer[:, l] = np.where(occ > 0, sums / np.maximum(occ, 1), np.nan)
    mean = per_layer.mean(axis=1) if L else np.full(nb, np.nan)
    types = np.array([len(np.unique(token_ids[bucket == b])) for b in range(nb)], np.int64)
    sorted_counts = np.sort(counts)[::-1]
    count_hi = sorted_counts[edges[:-1] - 1]
    count_lo = sorted_counts[edges[1:] - 2]
    kk = k.mean(axis=0)
    lf = np.log1p(counts[token_ids].astype(np.float64))
    corr = float(np.corrcoef(lf, kk)[0, 1]) if len(kk) > 1 and lf.std() > 0 and kk.std() > 0 \
        else float("nan")
    return {"rank_lo": edges[:-1], "rank_hi": edges[1:] - 1, "count_hi": count_hi,
            "count_lo": count_lo, "occurrences": occ, "types": types, "per_layer": per_layer,
            "mean": mean, "corr": corr}

