"""Expert specialisation (numpy, on routing maps): expert share by domain (paper Fig. 9), active
experts per layer and domain (Fig. 12), the tokens most routed to each expert."""

from __future__ import annotations

from typing import Optional

import numpy as np


def domain_expert_share(routing: np.ndarray, domains: np.ndarray, num_domains: int) -> tuple:
    """(counts [L, D, E], share [L, D, E]): assignments of domain d's tokens to expert e, and
    their share of all (token, expert) assignments of domain d in that layer (rows sum to 1, or
    0 when the domain's tokens were routed nowhere) - the paper's Fig. 9."""
    L, N, E = routing.shape
    counts = np.zeros((L, num_domains, E), np.int64)
    for d in range(num_domains):
        counts[:, d, :] = routing[:, domains == d, :].sum(axis=1)
    totals = counts.sum(axis=2, keepdims=True)
    share = counts / np.maximum(totals, 1)
    return counts, share


def active_experts_by_domain(routing: np.ndarray, domains: np.ndarray,
                             num_domains: int) -> tuple:
    """(mean experts per token [L, D], tokens [D]) - the paper's Fig. 12."""
    k = routing.sum(axis=2).astype(np.float64)  # [L, N]
    tokens = np.bincount(domains, minlength=num_domains)[:num_domains]
    mean = np.full((routing.shape[0], num_domains), np.nan)
    for d in range(num_domains):
        if tokens[d]:
            mean[:, d] = k[:, domains == d].mean(axis=1)
    return mean, tokens


def top_tokens_per_expert(routing: np.ndarray, token_ids: np.ndarray, top: int = 10,
                          vocab_size: Optional[int] = None) -> list:
    """For every layer index l and expert e, the `top` token ids routed there most often:
    [(l, e, [(token_id, count, share_of_expert, share_of_token)])], where share_of_expert =
    count / tokens routed to e, share_of_token = count / occurrences of that token id."""
    L, N, E = routing.shape
    V = int(vocab_size or (int(token_ids.max()) + 1 if N else 1))
    occ = np.bincount(token_ids, minlength=V)
    out = []
    for l in range(L):
        tok_idx, exp_idx = np.nonzero(routing[l])
        pair = np.bincount(token_ids[tok_idx] * E + exp_idx, minlength=V * E).reshape(V, E)
        for e in range(E):
            col = pair[:, e]
            total = int(col.sum())
            n = min(top, int((col > 0).sum()))
            if n == 0:
                out.append((l, e, []))
                continue
            idx = np.argpartition(-col, n - 1)[:n]
            idx = idx[np.lexsort((idx, -col[idx]))]
            out.append((l, e, [(int(t), int(col[t]), col[t] / total, col[t] / occ[t])
                               for t in idx]))
    return out

