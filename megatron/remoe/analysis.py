"""Offline routing analysis of trained (ReLU or TopK) MoE checkpoints: paper Figs. 7, 9 and 12.

Pipeline (each stage is a plain function, usable on an in-memory model):

    eval tokens      `make_eval_tokens(domain -> prefix, tokens_per_domain, seq_length)`
    token frequency  `token_frequencies(train prefixes, vocab_size)`
    capture          `capture_routing(model, eval_tokens)` -> `RoutingCapture` (routing map of every
                     MoE layer for every analysed token; eval mode, no grad, forward hooks on the
                     routers)
    statistics       pure numpy on routing maps: `layer_summary`, `experts_by_frequency`,
                     `domain_expert_share`, `active_experts_by_domain`, `top_tokens_per_expert`,
                     `flip_rates`
    figures          `fig_*` return matplotlib Figures (Agg) with titles, axis labels, legends or
                     colorbars (`figure_problems` checks that)
    report           `write_report(out_dir, ...)`: PNGs, the CSV behind each figure, report.md
    everything       `analyze(models, eval_tokens, ...)`

`load_checkpoint_model(path)` is the checkpoint front end: it rebuilds the model of any saved
parallel layout as a single-process model (TP=PP=EP=CP=1) from the config stored in the checkpoint
and lets dist_checkpointing re-shard the weights into it. The CLI is `tools/analyze_routing.py`.

Conventions: a routing map is a bool array `[L, N, E]` (MoE layers x analysed tokens x experts),
True where the token is dispatched to the expert. ReLU routers route to 0..E experts, TopK to k.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Errors and logging
# ------------------------------------------------------------------------------------------------


class AnalysisError(ValueError):
    """A problem with the inputs (checkpoint, data, output folder); the message is one line."""


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Evaluation tokens
# ------------------------------------------------------------------------------------------------


@dataclass
class EvalTokens:
    """The analysed tokens: per-domain token streams cut into sequences of at most seq_length."""

    domain_names: list
    sequences: list  # list of 1-D int64 arrays
    seq_domain: list  # domain index of each sequence
    seq_length: int

    @property
    def token_ids(self) -> np.ndarray:
        return np.concatenate(self.sequences) if self.sequences else np.zeros(0, np.int64)

    @property
    def domains(self) -> np.ndarray:
        return np.concatenate([np.full(len(s), d, np.int64)
                               for s, d in zip(self.sequences, self.seq_domain)]) \
            if self.sequences else np.zeros(0, np.int64)

    def tokens_per_domain(self) -> dict:
        counts = {d: 0 for d in self.domain_names}
        for s, d in zip(self.sequences, self.seq_domain):
            counts[self.domain_names[d]] += len(s)
        return counts


def _open_indexed(prefix: str, tokenizer=None):
    """IndexedDataset of `prefix` with the data helper's integrity and tokenizer checks."""
    from megatron.remoe.data.errors import DataError
    from megatron.remoe.data.preprocess import load_indexed_dataset

    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise AnalysisError(f"data prefix {prefix}: {prefix}.bin/.idx not found")
    try:
        return load_indexed_dataset(prefix, tokenizer if hasattr(tokenizer, "fingerprint")
                                    else None)
    except DataError as e:
        raise AnalysisError(" ".join(str(e).split())) from None


def read_domain_tokens(prefix: str, max_tokens: int, tokenizer=None) -> np.ndarray:
    """The first `max_tokens` tokens of a dataset, documents in order (EOD tokens as stored)."""
    ds = _open_indexed(prefix, tokenizer)
    parts, total = [], 0
    for i in range(len(ds)):
        if total >= max_tokens:
            break
        doc = np.asarray(ds[i], dtype=np.int64)
        parts.append(doc[: max_tokens - total])
        total += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def make_eval_tokens(domain_prefixes: dict, tokens_per_domain: int, seq_length: int,
                     tokenizer=None, log: Callable = _default_log) -> EvalTokens:
    """Read up to `tokens_per_domain` tokens of every domain and cut them into sequences."""
    if tokens_per_domain < 2:
        raise AnalysisError("--tokens-per-domain must be at least 2")
    names, seqs, seq_dom = [], [], []
    for d, (name, prefix) in enumerate(domain_prefixes.items()):
        toks = read_domain_tokens(prefix, tokens_per_domain, tokenizer)
        if len(toks) == 0:
            raise AnalysisError(f"data prefix {prefix} (domain {name}) holds no tokens")
        names.append(name)
        for start in range(0, len(toks), seq_length):
            seqs.append(toks[start:start + seq_length])
            seq_dom.append(d)
        if len(toks) < tokens_per_domain:
            log(f"analyze: domain {name}: only {len(toks):,} tokens available "
                f"(asked for {tokens_per_domain:,})")
    return EvalTokens(names, seqs, seq_dom, seq_length)


def token_frequencies(prefixes: Sequence[str], vocab_size: int,
                      max_tokens: Optional[int] = None) -> np.ndarray:
    """Token counts `[vocab_size]` over the given datasets (the training split), read directly
    from the `.bin` files; at most `max_tokens` tokens from each prefix."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for prefix in prefixes:
        ds = _open_indexed(prefix)
        data = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
        if max_tokens is not None:
            data = data[:max_tokens]
        c = np.bincount(np.asarray(data, dtype=np.int64), minlength=vocab_size)
        if len(c) > vocab_size:
            raise AnalysisError(f"{prefix} holds token id {len(c) - 1} >= vocabulary size "
                                f"{vocab_size}; wrong tokenizer for this data?")
        counts += c
    return counts


# ------------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------------


@dataclass
class RoutingCapture:
    """Routing of every analysed token in every MoE layer of one model."""

    label: str
    layer_numbers: list  # global 1-based layer numbers of the MoE layers
    num_experts: int
    routing: np.ndarray  # [L, N, E] bool
    top1: np.ndarray  # [L, N] int16: expert with the largest gate, -1 when no expert is active
    token_ids: np.ndarray  # [N] int64
    domains: np.ndarray  # [N] int64 (index into domain_names)
    domain_names: list
    loss_sum: dict = field(default_factory=dict)  # domain -> summed LM loss (next-token)
    loss_tokens: dict = field(default_factory=dict)  # domain -> predicted tokens
    router: str = ""  # "relu", "topk", ...
    topk: Optional[int] = None
    info: dict = field(default_factory=dict)  # checkpoint, iteration, ...

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def domain_loss(self) -> dict:
        return {d: self.loss_sum[d] / self.loss_tokens[d] for d in self.loss_sum
                if self.loss_tokens.get(d)}


def moe_routers(model) -> list:
    """[(layer_number, router module)] of the MoE layers of a (possibly wrapped) GPT model."""
    from megatron.core.transformer.moe.router import Router

    routers = [(int(m.layer_number), m) for m in model.modules() if isinstance(m, Router)]
    if not routers:
        raise AnalysisError("the model has no MoE layer (a dense model): nothing to analyse")
    return sorted(routers, key=lambda x: x[0])


def _router_kind(model) -> tuple:
    config = getattr(model, "config", None)
    if getattr(config, "moe_relu_routing", False):
        return "relu", getattr(config, "moe_router_topk", None)
    return ("topk", getattr(config, "moe_router_topk", None)) if config is not None else ("", None)


def capture_routing(model, eval_tokens: EvalTokens, label: str = "model", batch_size: int = 8,
                    log: Callable = _default_log, device=None) -> RoutingCapture:
    """Run `model` (eval mode, no grad) over the evaluation tokens and record every MoE router's
    routing map (forward hooks). Also sums the next-token loss per domain."""
    import torch

    routers = moe_routers(model)
    layer_numbers = [n for n, _ in routers]
    E = int(routers[0][1].config.num_moe_experts)
    if device is None:
        device = next(model.parameters()).device
    seen: dict = {}

    def hook(layer_number):
        def fn(module, args, output):
            probs, routing_map = output[0], output[1]
            seen[layer_number] = (probs.detach(), routing_map.detach())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in routers]
    N = sum(len(s) for s in eval_tokens.sequences)
    routing = np.zeros((len(routers), N, E), dtype=bool)
    top1 = np.full((len(routers), N), -1, dtype=np.int16)
    loss_sum = {d: 0.0 for d in eval_tokens.domain_names}
    loss_tokens = {d: 0 for d in eval_tokens.domain_names}
    was_training = model.training
    model.eval()
    start, t0, last_log, done = 0, time.perf_counter(), time.perf_counter(), 0
    seqs = eval_tokens.sequences
    try:
        with torch.no_grad():
            i = 0
            while i < len(seqs):
                # consecutive sequences of equal length form one batch
                j = i + 1
                while j < len(seqs) and j - i < batch_size and len(seqs[j]) == len(seqs[i]):
                    j += 1
                batch = torch.from_numpy(np.stack(seqs[i:j])).to(device)
                B, S = batch.shape
                pos = torch.arange(S, device=device).unsqueeze(0).expand(B, S)
                labels = torch.roll(batch, -1, dims=1)
                seen.clear()
                loss = model(batch, pos, None, labels=labels)  # [B, S]
                for li, n in enumerate(layer_numbers):
                    if n not in seen:
                        raise RuntimeError(f"router of layer {n} did not run")
                    probs, rmap = seen[n]
                    # megatron routes [S, B, H] hidden states: row s * B + b -> token (b, s)
                    rmap = rmap.reshape(S, B, E).transpose(0, 1).reshape(B * S, E)
                    probs = probs.float().reshape(S, B, E).transpose(0, 1).reshape(B * S, E)
                    routing[li, start:start + B * S] = rmap.cpu().numpy()
                    best = probs.argmax(dim=1)
                    best[~rmap.any(dim=1)] = -1
                    top1[li, start:start + B * S] = best.cpu().numpy().astype(np.int16)
                if loss is not None and S > 1:
                    per_seq = loss.float()[:, :-1].sum(dim=1).cpu().numpy()
                    for b in range(B):
                        d = eval_tokens.domain_names[eval_tokens.seq_domain[i + b]]
                        loss_sum[d] += float(per_seq[b])
                        loss_tokens[d] += S - 1
                start += B * S
                done += B * S
                i = j
                if time.perf_counter() - last_log > 10:
                    last_log = time.perf_counter()
                    log(f"analyze: [{label}] {done:,}/{N:,} tokens "
                        f"({done / (last_log - t0):,.0f} tok/s)")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    router, topk = _router_kind(model)
    cap = RoutingCapture(label, layer_numbers, E, routing, top1, eval_tokens.token_ids,
                         eval_tokens.domains, list(eval_tokens.domain_names), loss_sum,
                         loss_tokens, router, topk)
    log(f"analyze: [{label}] routed {N:,} tokens through {len(layer_numbers)} MoE layers in "
        f"{time.perf_counter() - t0:.1f} s")
    return cap


# ------------------------------------------------------------------------------------------------
# Statistics (numpy, on routing maps)
# ------------------------------------------------------------------------------------------------


def routing_stats(routing: np.ndarray, layer_numbers: Sequence[int]):
    """The trainer's `RoutingStats` of a routing map [L, N, E] (same derived metrics/names)."""
    import torch

    from megatron.remoe.regularizer import RoutingStats

    L, N, E = routing.shape
    tpe = routing.sum(axis=1).astype(np.int64)  # [L, E]
    k = routing.sum(axis=2)  # [L, N]
    hist = np.stack([np.bincount(k[l], minlength=E + 1) for l in range(L)]) if L else \
        np.zeros((0, E + 1), np.int64)
    sparsity = 1.0 - float(tpe.sum()) / max(L * N * E, 1)
    return RoutingStats(sparsity=sparsity, l1_coeff=float("nan"), l1_reg_loss=float("nan"),
                        layer_numbers=list(layer_numbers),
                        tokens_per_expert=torch.from_numpy(tpe),
                        experts_per_token_hist=torch.from_numpy(hist.astype(np.int64)),
                        tokens=torch.full((L,), N, dtype=torch.int64))


def layer_summary(routing: np.ndarray, layer_numbers: Sequence[int]) -> list:
    """Per MoE layer: sparsity, mean experts per token, zero-expert-token fraction, dead experts
    (no analysed token routed to them), max/mean expert load and the experts-per-token
    histogram."""
    stats = routing_stats(routing, layer_numbers)
    rows = []
    for i, layer in enumerate(layer_numbers):
        load = stats.tokens_per_expert[i]
        dead = [int(e) for e in np.flatnonzero(load.numpy() == 0)]
        rows.append({
            "layer": int(layer), "tokens": int(stats.tokens[i]),
            "sparsity": float(stats.layer_sparsity[i]),
            "experts_per_token": float(stats.mean_experts_per_token[i]),
            "zero_expert_fraction": float(stats.zero_expert_fraction[i]),
            "dead_experts": len(dead), "dead_expert_ids": " ".join(map(str, dead)),
            "max_over_mean_load": float(stats.max_over_mean_load[i]),
            "experts_per_token_hist": " ".join(str(int(x))
                                               for x in stats.experts_per_token_hist[i]),
        })
    return rows


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


def flip_rates(a: RoutingCapture, b: RoutingCapture) -> list:
    """Per layer, on the same tokens: the fraction whose routed expert SET differs between the
    two captures, and the fraction whose top-1 expert (largest gate; 'none' for zero experts)
    differs. For a TopK k=1 model both numbers are the same."""
    if a.routing.shape != b.routing.shape or a.layer_numbers != b.layer_numbers:
        raise AnalysisError(
            f"cannot compare routing of {a.label} ({len(a.layer_numbers)} MoE layers x "
            f"{a.num_experts} experts, {a.num_tokens:,} tokens) with {b.label} "
            f"({len(b.layer_numbers)} x {b.num_experts}, {b.num_tokens:,} tokens): the models "
            "must have the same MoE layers and experts")
    if not np.array_equal(a.token_ids, b.token_ids):
        raise AnalysisError(f"{a.label} and {b.label} were not run on the same tokens")
    rows = []
    for l, layer in enumerate(a.layer_numbers):
        changed = (a.routing[l] != b.routing[l]).any(axis=1)
        rows.append({"layer": int(layer), "tokens": int(a.num_tokens),
                     "set_flip_rate": float(changed.mean()) if a.num_tokens else float("nan"),
                     "top1_flip_rate": float((a.top1[l] != b.top1[l]).mean())
                     if a.num_tokens else float("nan")})
    return rows


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
# ------------------------------------------------------------------------------------------------


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError("figures need matplotlib: pip install 'megatron-remoe[plots]' "
                            "(or run with --no-figures)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_problems(fig) -> list:
    """What a figure lacks: a title (figure or every plotted axes), axis labels, a legend or a
    colorbar. Empty when complete."""
    problems = []
    sup = fig.get_suptitle() if hasattr(fig, "get_suptitle") else \
        (fig._suptitle.get_text() if fig._suptitle is not None else "")
    has_suptitle = bool(sup)
    data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.has_data()]
    if not data_axes:
        problems.append("no plotted axes")
    for i, ax in enumerate(data_axes):
        name = ax.get_title() or f"axes {i}"
        if not (ax.get_title() or has_suptitle):
            problems.append(f"{name}: no title")
        if not ax.get_xlabel():
            problems.append(f"{name}: no x label")
        if not ax.get_ylabel():
            problems.append(f"{name}: no y label")
        if ax.images and not any(getattr(im, "colorbar", None) for im in ax.images):
            problems.append(f"{name}: image without colorbar")
        if len(ax.lines) + len(ax.containers) > 1 and ax.get_legend() is None \
                and fig.legends == []:
            problems.append(f"{name}: several series but no legend")
    return problems


def _grid(n: int, max_cols: int = 4) -> tuple:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def fig_experts_vs_frequency(results: list, k_ref: Optional[float] = None):
    """Fig. 7: mean experts per token by frequency-rank bucket; one panel per model, a thin line
    per layer and a bold line for the mean over layers. results: [(label, experts_by_frequency
    dict, layer_numbers)]."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False,
                             sharey=True)
    for ax, (label, r, layers) in zip(axes[0], results):
        x = np.sqrt(r["rank_lo"] * np.maximum(r["rank_hi"], r["rank_lo"]))  # geometric centre
        ok = r["occurrences"] > 0
        for l, layer in enumerate(layers):
            ax.plot(x[ok], r["per_layer"][ok, l], lw=1, alpha=0.6, marker=".",
                    label=f"layer {layer}")
        ax.plot(x[ok], r["mean"][ok], lw=2.5, color="black", marker="o", label="mean over layers")
        if k_ref is not None:
            ax.axhline(k_ref, ls="--", color="grey", lw=1, label=f"k = {k_ref:g}")
        ax.set_xscale("log")
        ax.set_xlabel("token frequency rank in training data (1 = most frequent, log)")
        ax.set_ylabel("mean experts per token")
        ax.set_title(f"{label}: experts per token vs token frequency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_domain_share(label: str, share: np.ndarray, layer_numbers: Sequence[int],
                     domain_names: Sequence[str], vmax: Optional[float] = None):
    """Fig. 9: per layer, heatmap of the share of each domain's assignments going to each expert
    (one colour scale for all layers; pass `vmax` to share it between models)."""
    plt = _plt()
    L, D, E = share.shape
    rows, cols = _grid(L, 2)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2, 0.45 * E + 1.8) * cols,
                                                  (0.4 * D + 1.4) * rows), squeeze=False)
    vmax = max(float(vmax if vmax is not None else share.max()), 1e-9)
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.set_visible(False)
            continue
        im = ax.imshow(share[i], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"layer {layer_numbers[i]}")
        ax.set_xlabel("expert")
        ax.set_ylabel("domain")
        ax.set_xticks(range(E))
        ax.set_xticklabels([str(e) for e in range(E)], fontsize=7)
        ax.set_yticks(range(D))
        ax.set_yticklabels(domain_names, fontsize=8)
        fig.colorbar(im, ax=ax, label="share of domain's assignments")
    fig.suptitle(f"{label}: share of each domain's routed (token, expert) assignments per expert")
    fig.tight_layout()
    return fig


def fig_active_experts(results: list, domain_names: Sequence[str], k_ref: Optional[float] = None):
    """Fig. 12: mean experts per token per layer, one line per domain, one panel per model.
    results: [(label, mean [L, D], layer_numbers)]."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False,
                             sharey=True)
    for ax, (label, mean, layers) in zip(axes[0], results):
        for d, name in enumerate(domain_names):
            ax.plot(layers, mean[:, d], marker="o", label=name)
        if k_ref is not None:
            ax.axhline(k_ref, ls="--", color="grey", lw=1, label=f"k = {k_ref:g}")
        ax.set_xticks(list(layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("mean experts per token")
        ax.set_title(f"{label}: active experts per layer and domain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_flip_rate(rows_by_pair: list):
    """Routing flips per layer between two checkpoints; one bar group per compared pair.
    rows_by_pair: [(pair label, flip_rates rows)]."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    n = len(rows_by_pair)
    width = 0.8 / max(n, 1)
    for col, (key, title) in enumerate((("set_flip_rate", "expert set changes"),
                                        ("top1_flip_rate", "top-1 expert changes"))):
        ax = axes[0, col]
        for p, (pair, rows) in enumerate(rows_by_pair):
            x = np.arange(len(rows)) + (p - (n - 1) / 2) * width
            ax.bar(x, [r[key] for r in rows], width=width, label=pair)
        if rows_by_pair:
            ax.set_xticks(range(len(rows_by_pair[0][1])))
            ax.set_xticklabels([str(r["layer"]) for r in rows_by_pair[0][1]])
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"routing flip rate: {title}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_expert_load(results: list):
    """Expert load per layer (share of the layer's assignments per expert), one panel per model.
    results: [(label, counts [L, E], layer_numbers)]."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.0), squeeze=False)
    for ax, (label, counts, layers) in zip(axes[0], results):
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="magma", vmin=0.0)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(x) for x in layers])
        ax.set_xticks(range(counts.shape[1]))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{label}: expert load (share of assignments)")
        fig.colorbar(im, ax=ax, label="share of the layer's assignments")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _slug(label: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "_" for c in label.strip())
    return s or "model"


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow([_fmt_csv(x) for x in r])


def _fmt_csv(x):
    if isinstance(x, (float, np.floating)):
        return "" if math.isnan(x) else f"{float(x):.6g}"
    if isinstance(x, np.integer):
        return int(x)
    return x


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def token_text(tokenizer, token_id: int) -> str:
    """A readable form of one token: whitespace made visible."""
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return f"<{token_id}>"
    try:
        s = tokenizer.decode([token_id])
    except Exception:
        return f"<{token_id}>"
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return s.replace(" ", "\u2423") if s.strip() == "" or s.startswith(" ") else s


def _md_code(s: str) -> str:
    return "<code>" + html.escape(s).replace("|", "&#124;") + "</code>"


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class AnalysisResult:
    out_dir: str
    report: str
    files: list
    figures: dict  # name -> matplotlib Figure (closed after saving; kept for inspection)
    captures: list
    summaries: dict  # label -> layer_summary rows
    flips: list  # [(label, other label, rows)]
    seconds: float = 0.0


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AnalysisError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise AnalysisError(f"--out {out_dir} is not empty; pass --overwrite or choose another "
                            "directory")
    os.makedirs(out_dir, exist_ok=True)


def write_report(out_dir: str, captures: list, freq_counts: np.ndarray, tokenizer=None,
                 flips: Sequence = (), freq_source: str = "", num_buckets: int = 12,
                 top: int = 10, figures: bool = True, meta: Optional[dict] = None,
                 log: Callable = _default_log) -> AnalysisResult:
    """Compute every statistic from the captures and write figures, CSVs and report.md."""
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    files, figs = [], {}
    domain_names = captures[0].domain_names
    D = len(domain_names)
    V = len(freq_counts)
    meta = dict(meta or {})

    def save(name: str, fig) -> str:
        problems = figure_problems(fig)
        if problems:
            raise AssertionError(f"figure {name} is incomplete: {problems}")
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        figs[name] = fig
        files.append(path)
        _plt().close(fig)
        return name

    def csv_file(name, header, rows) -> str:
        path = os.path.join(out_dir, name)
        _write_csv(path, header, rows)
        files.append(path)
        return name

    def k_ref(c: RoutingCapture):
        return float(c.topk) if c.topk else None

    labels = [c.label for c in captures]
    md = [f"# Routing analysis: {', '.join(labels)}", ""]
    md.append("Generated by `tools/analyze_routing.py` (`megatron.remoe.analysis`); see "
              "docs/analysis.md for what each figure means.")
    md.append("")
    md.append(_md_table(
        ["model", "router", "checkpoint", "iteration", "MoE layers", "experts", "k",
         "tokens analysed"],
        [[c.label, c.router or "-", _md_code(str(c.info.get("checkpoint", "(in memory)"))),
          c.info.get("iteration", "-"), len(c.layer_numbers), c.num_experts,
          c.topk if c.topk is not None else "-", f"{c.num_tokens:,}"] for c in captures]))
    md.append("")
    tpd = {d: int((captures[0].domains == i).sum()) for i, d in enumerate(domain_names)}
    md.append("Analysed tokens per domain: " + ", ".join(f"{d} {n:,}" for d, n in tpd.items())
              + ".")
    if meta.get("data"):
        md.append("")
        md.append("Evaluation data: " + ", ".join(f"{d} = {_md_code(p)}"
                                                   for d, p in meta["data"].items()) + ".")
    md.append("")

    # ---- 6. summary (first: the headline numbers)
    summaries = {c.label: layer_summary(c.routing, c.layer_numbers) for c in captures}
    rows = [[lab, r["layer"], r["tokens"], r["sparsity"], r["experts_per_token"],
             r["zero_expert_fraction"], r["dead_experts"], r["dead_expert_ids"],
             r["max_over_mean_load"], r["experts_per_token_hist"]]
            for lab, rs in summaries.items() for r in rs]
    summary_csv = csv_file("summary.csv", ["model", "layer", "tokens", "sparsity",
                                           "experts_per_token", "zero_expert_fraction",
                                           "dead_experts", "dead_expert_ids",
                                           "max_over_mean_load", "experts_per_token_hist"], rows)
    md.append("## 1. Per-layer summary")
    md.append("")
    md.append("Sparsity = fraction of zero entries of the routing map; dead experts = experts "
              "that received no analysed token; load = tokens routed to an expert. "
              f"Numbers: [{summary_csv}]({summary_csv}).")
    md.append("")
    md.append(_md_table(
        ["model", "layer", "sparsity", "experts/token", "zero-expert tokens", "dead experts",
         "max/mean load"],
        [[lab, r["layer"], _f(r["sparsity"]), _f(r["experts_per_token"]),
          _f(r["zero_expert_fraction"]),
          f"{r['dead_experts']}" + (f" ({r['dead_expert_ids']})" if r["dead_experts"] else ""),
          _f(r["max_over_mean_load"], 2)] for lab, rs in summaries.items() for r in rs]))
    md.append("")
    losses = [(c.label, c.domain_loss()) for c in captures if c.domain_loss()]
    if losses:
        md.append("Next-token loss on the analysed tokens (per domain):")
        md.append("")
        md.append(_md_table(["model"] + domain_names + ["mean"],
                            [[lab] + [_f(dl.get(d)) for d in domain_names]
                             + [_f(float(np.mean(list(dl.values()))))] for lab, dl in losses]))
        md.append("")
    loads = [(c.label, c.routing.sum(axis=1), c.layer_numbers) for c in captures]
    load_csv = csv_file("expert_load.csv", ["model", "layer", "expert", "tokens", "share"],
                        [[lab, layer, e, int(cnt[l, e]), cnt[l, e] / max(cnt[l].sum(), 1)]
                         for lab, cnt, layers in loads for l, layer in enumerate(layers)
                         for e in range(cnt.shape[1])])
    if figures:
        name = save("expert_load.png", fig_expert_load(loads))
        md.append(f"![expert load]({name})")
        md.append("")
        md.append(f"Expert load per layer; numbers: [{load_csv}]({load_csv}).")
        md.append("")

    # ---- 1. experts per token vs frequency (Fig. 7)
    md.append("## 2. Experts per token vs token frequency (paper Fig. 7)")
    md.append("")
    md.append(f"Token frequency counted on {freq_source or 'the analysed data'}: "
              f"{int(freq_counts.sum()):,} tokens, vocabulary {V:,}. Tokens are bucketed by "
              "frequency rank with log-spaced bucket edges. With ReLU routing rarer tokens "
              "(higher rank, right) should get more experts; TopK gives every token exactly k.")
    md.append("")
    fr = [(c.label, experts_by_frequency(c.routing, c.token_ids, freq_counts, num_buckets),
           c.layer_numbers) for c in captures]
    meta["frequency_correlation"] = {lab: r["corr"] for lab, r, _ in fr}
    rows = []
    for lab, r, layers in fr:
        for b in range(len(r["rank_lo"])):
            rows.append([lab, b, int(r["rank_lo"][b]), int(r["rank_hi"][b]), int(r["count_hi"][b]),
                         int(r["count_lo"][b]), int(r["occurrences"][b]), int(r["types"][b]),
                         r["mean"][b]] + [r["per_layer"][b, l] for l in range(len(layers))])
    max_l = max(len(c.layer_numbers) for c in captures)
    layer_cols = [f"layer_{n}" for n in captures[0].layer_numbers] \
        if all(c.layer_numbers == captures[0].layer_numbers for c in captures) \
        else [f"moe_layer_{i}" for i in range(max_l)]
    fcsv = csv_file("experts_vs_frequency.csv",
                    ["model", "bucket", "rank_lo", "rank_hi", "train_count_max",
                     "train_count_min", "occurrences", "distinct_tokens",
                     "mean_experts_per_token"] + layer_cols, rows)
    if figures:
        name = save("experts_vs_frequency.png",
                    fig_experts_vs_frequency(fr, k_ref(captures[0]) if len(
                        {c.topk for c in captures}) == 1 else None))
        md.append(f"![experts per token vs token frequency]({name})")
        md.append("")
    md.append(f"Numbers: [{fcsv}]({fcsv}). Correlation between log(1 + training count) and "
              "experts per token (averaged over layers) over the analysed tokens: "
              + ", ".join(f"{lab} {_f(r['corr'])}" for lab, r, _ in fr)
              + " (negative: rarer tokens get more experts).")
    md.append("")
    hdr = ["ranks", "train count"] + [f"{lab}: experts/token" for lab, _, _ in fr] + ["tokens"]
    r0 = fr[0][1]
    md.append(_md_table(hdr, [[f"{r0['rank_lo'][b]}-{r0['rank_hi'][b]}",
                               f"{r0['count_hi'][b]:,}-{r0['count_lo'][b]:,}"]
                              + [_f(r["mean"][b], 2) for _, r, _ in fr]
                              + [f"{r0['occurrences'][b]:,}"]
                              for b in range(len(r0["rank_lo"])) if r0["occurrences"][b]]))
    md.append("")

    # ---- 2. domain x expert share (Fig. 9)
    md.append("## 3. Expert share by domain, per layer (paper Fig. 9)")
    md.append("")
    md.append("For each layer and domain: the share of that domain's routed (token, expert) "
              "assignments that go to each expert (each row sums to 1). Uniform rows mean no "
              "specialisation; a bright cell is an expert that takes most of a domain.")
    md.append("")
    rows = []
    shares = {c.label: domain_expert_share(c.routing, c.domains, D) for c in captures}
    vmax = max(float(s.max()) for _, s in shares.values())
    for c in captures:
        counts, share = shares[c.label]
        for l, layer in enumerate(c.layer_numbers):
            for d, dn in enumerate(domain_names):
                for e in range(c.num_experts):
                    rows.append([c.label, layer, dn, e, int(counts[l, d, e]), share[l, d, e]])
        if figures:
            name = save(f"domain_expert_share_{_slug(c.label)}.png",
                        fig_domain_share(c.label, share, c.layer_numbers, domain_names,
                                         vmax))
            md.append(f"![domain x expert share, {c.label}]({name})")
            md.append("")
        # the most specialised (layer, domain, expert) cells
        best = sorted(((share[l, d, e], l, d, e) for l in range(share.shape[0])
                       for d in range(D) for e in range(c.num_experts)), reverse=True)[:3]
        md.append(f"{c.label}: largest shares: " + "; ".join(
            f"layer {c.layer_numbers[l]} expert {e} takes {s:.0%} of {domain_names[d]}"
            for s, l, d, e in best) + f" (uniform would be {1 / c.num_experts:.0%}).")
        md.append("")
    dcsv = csv_file("domain_expert_share.csv",
                    ["model", "layer", "domain", "expert", "assignments", "share"], rows)
    md.append(f"Numbers: [{dcsv}]({dcsv}).")
    md.append("")

    # ---- 3. active experts per layer and domain (Fig. 12)
    md.append("## 4. Active experts per layer and domain (paper Fig. 12)")
    md.append("")
    act = []
    rows = []
    for c in captures:
        mean, tokens = active_experts_by_domain(c.routing, c.domains, D)
        act.append((c.label, mean, c.layer_numbers))
        for l, layer in enumerate(c.layer_numbers):
            for d, dn in enumerate(domain_names):
                rows.append([c.label, layer, dn, int(tokens[d]), mean[l, d]])
    acsv = csv_file("active_experts.csv",
                    ["model", "layer", "domain", "tokens", "mean_experts_per_token"], rows)
    if figures:
        name = save("active_experts.png", fig_active_experts(
            act, domain_names, k_ref(captures[0]) if len({c.topk for c in captures}) == 1
            else None))
        md.append(f"![active experts per layer and domain]({name})")
        md.append("")
    md.append(f"Mean experts per token; numbers: [{acsv}]({acsv}).")
    md.append("")
    md.append(_md_table(["model", "layer"] + domain_names + ["spread (max-min)"],
                        [[lab, layer] + [_f(mean[l, d], 2) for d in range(D)]
                         + [_f(float(np.nanmax(mean[l]) - np.nanmin(mean[l])), 2)]
                         for lab, mean, layers in act for l, layer in enumerate(layers)]))
    md.append("")

    # ---- 4. top tokens per expert
    md.append(f"## 5. Tokens most routed to each expert (top {top})")
    md.append("")
    md.append("count = occurrences of the token routed to the expert; share = count / all "
              "tokens routed to the expert; of token = count / all occurrences of the token.")
    md.append("")
    rows = []
    for c in captures:
        tt = top_tokens_per_expert(c.routing, c.token_ids, top, vocab_size=V)
        md.append(f"### {c.label}")
        md.append("")
        for l, layer in enumerate(c.layer_numbers):
            md.append(f"<details><summary>layer {layer}</summary>")
            md.append("")
            table = []
            for (li, e, items) in tt:
                if li != l:
                    continue
                for rank, (t, cnt, s_e, s_t) in enumerate(items, 1):
                    rows.append([c.label, layer, e, rank, t, token_text(tokenizer, t), cnt, s_e,
                                 s_t])
                table.append([e, ", ".join(f"{_md_code(token_text(tokenizer, t))} {cnt} "
                                           f"({s_e:.1%})" for t, cnt, s_e, _ in items) or "-"])
            md.append(_md_table(["expert", "tokens: count (share of expert)"], table))
            md.append("")
            md.append("</details>")
            md.append("")
    tcsv = csv_file("top_tokens.csv", ["model", "layer", "expert", "rank", "token_id", "token",
                                       "count", "share_of_expert", "share_of_token"], rows)
    md.append(f"All layers and experts: [{tcsv}]({tcsv}).")
    md.append("")

    # ---- 5. flip rate
    md.append("## 6. Routing flip rate between checkpoints")
    md.append("")
    if flips:
        md.append("On the same tokens: the fraction whose routed expert set differs between the "
                  "two checkpoints, and the fraction whose top-1 expert (largest gate; 'no "
                  "expert' counts as a value) differs. For TopK with k=1 both are equal.")
        md.append("")
        rows = [[a, b, r["layer"], r["tokens"], r["set_flip_rate"], r["top1_flip_rate"]]
                for a, b, rs in flips for r in rs]
        xcsv = csv_file("flip_rate.csv", ["model", "compared_with", "layer", "tokens",
                                          "set_flip_rate", "top1_flip_rate"], rows)
        if figures:
            name = save("flip_rate.png", fig_flip_rate([(f"{a} vs {b}", rs)
                                                        for a, b, rs in flips]))
            md.append(f"![routing flip rate]({name})")
            md.append("")
        md.append(_md_table(["model", "compared with", "layer", "expert set changed",
                             "top-1 changed"],
                            [[a, b, r["layer"], _f(r["set_flip_rate"]), _f(r["top1_flip_rate"])]
                             for a, b, rs in flips for r in rs]
                            + [[a, b, "mean", _f(float(np.mean([r["set_flip_rate"] for r in rs]))),
                                _f(float(np.mean([r["top1_flip_rate"] for r in rs])))]
                               for a, b, rs in flips]))
        md.append("")
        md.append(f"Numbers: [{xcsv}]({xcsv}).")
    else:
        md.append("Not computed: pass `--compare-load OTHER_CHECKPOINT` (e.g. an earlier "
                  "checkpoint of the same run).")
    md.append("")

    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    files.append(report)
    meta.update(models=[{"label": c.label, "router": c.router, "topk": c.topk,
                         "layers": c.layer_numbers, "experts": c.num_experts,
                         "tokens": c.num_tokens, "loss": c.domain_loss(), **c.info}
                        for c in captures],
                tokens_per_domain=tpd, frequency_source=freq_source,
                frequency_tokens=int(freq_counts.sum()))
    with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, default=str)
    files.append(os.path.join(out_dir, "analysis.json"))
    log(f"analyze: wrote {len(files)} files to {out_dir} in {time.perf_counter() - t0:.1f} s")
    return AnalysisResult(out_dir, report, files, figs, list(captures), summaries, list(flips))


def analyze(models: Sequence, eval_tokens: EvalTokens, out_dir: str, tokenizer=None,
            freq_counts: Optional[np.ndarray] = None, freq_source: str = "",
            compare: Optional[dict] = None, vocab_size: Optional[int] = None,
            batch_size: int = 8, num_buckets: int = 12, top: int = 10, figures: bool = True,
            meta: Optional[dict] = None, log: Callable = _default_log) -> AnalysisResult:
    """Analyse in-memory models on the same tokens and write the report.

    models: [(label, model)] or [(label, model, info dict)];
    compare: {label: (other label, other model)} -> flip rates of `label` against the other model;
    freq_counts: token counts of the training split ([vocab]); None = count the analysed tokens.
    """
    t0 = time.perf_counter()
    captures = []
    for item in models:
        label, model = item[0], item[1]
        cap = capture_routing(model, eval_tokens, label, batch_size=batch_size, log=log)
        if len(item) > 2:
            cap.info.update(item[2])
        captures.append(cap)
    flips = []
    for label, (other_label, other_model) in (compare or {}).items():
        base = next((c for c in captures if c.label == label), None)
        if base is None:
            raise AnalysisError(f"compare: no model labelled {label}")
        other = capture_routing(other_model, eval_tokens, other_label, batch_size=batch_size,
                                log=log)
        flips.append((label, other_label, flip_rates(base, other)))
    if freq_counts is None:
        V = vocab_size or int(eval_tokens.token_ids.max()) + 1
        freq_counts = np.bincount(eval_tokens.token_ids, minlength=V)
        freq_source = freq_source or "the analysed tokens (no training split given)"
    result = write_report(out_dir, captures, freq_counts, tokenizer, flips, freq_source,
                          num_buckets, top, figures, meta, log)
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# Checkpoint front end
# ------------------------------------------------------------------------------------------------


def load_checkpoint_model(path: str, tokenizer=None, log: Callable = _default_log):
    """Build the checkpoint's model as a single-process fp32 model (TP=PP=EP=CP=1, no DDP) and
    load its weights: dist_checkpointing re-shards whatever layout it was saved in.
    Needs `init_distributed(ParallelConfig())` first. Returns (model, TrainConfig, info)."""
    import dataclasses

    import torch
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron.remoe.arguments import transformer_config
    from megatron.remoe.checkpointing import (
        read_checkpoint_config,
        resolve_checkpoint,
        sharded_metadata,
        single_process_config,
    )
    from megatron.remoe.datasets import padded_vocab_size
    from megatron.remoe.model import build_gpt_model

    path = resolve_checkpoint(path, log=log)
    cfg, common = read_checkpoint_config(path)
    if not cfg.moe:
        raise AnalysisError(f"checkpoint {path} is a dense model (router=dense): no routing to "
                            "analyse")
    saved_layout = common.get("layout") or {}
    single = single_process_config(cfg)
    if tokenizer is None:
        tokenizer = load_analysis_tokenizer(cfg)
    # the padded vocabulary of the TRAINING layout (padding depends on TP)
    base_vocab = tokenizer.vocab_size if tokenizer is not None else cfg.vocab_size
    vocab = padded_vocab_size(base_vocab, cfg) if base_vocab else None
    if vocab is None:
        raise AnalysisError(f"checkpoint {path}: unknown vocabulary size (no tokenizer in its "
                            "config); pass --tokenizer")

    def build(bf16: bool):
        c = dataclasses.replace(single, bf16=bf16)
        tcfg = transformer_config(c, use_cpu_initialization=True)
        model = build_gpt_model(tcfg, vocab_size=vocab, max_sequence_length=cfg.seq_length,
                                controller=None, use_transformer_engine=False,
                                rotary_base=cfg.rotary_base)
        for p in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        if bf16:
            model = model.to(torch.bfloat16)
        return model

    t0 = time.perf_counter()
    model = build(cfg.bf16)
    metadata = dist_checkpointing.load_content_metadata(path) or sharded_metadata()
    sd = {"model": model.sharded_state_dict(metadata=metadata)}
    try:
        state = dist_checkpointing.load(sd, path, strict="assume_ok_unexpected")
        model.load_state_dict(state["model"], strict=True)
    except Exception as e:  # noqa: BLE001
        raise AnalysisError(f"cannot load the model weights of {path}: "
                            f"{' '.join(str(e).split())[:400]}") from None
    if cfg.bf16:  # analyse in fp32 (ReLU gates near zero flip sign in bf16)
        fp32 = build(False)
        fp32.load_state_dict(model.state_dict(), strict=True)
        model = fp32
    info = {"checkpoint": path, "iteration": common.get("iteration"),
            "saved_layout": saved_layout, "router": cfg.router, "bf16_saved": cfg.bf16}
    log(f"analyze: loaded {path} ({cfg.router}, {cfg.num_layers} layers, E={cfg.num_experts}, "
        f"iteration {common.get('iteration')}, saved layout "
        f"TP{saved_layout.get('tp', '?')} PP{saved_layout.get('pp', '?')} "
        f"EP{saved_layout.get('ep', '?')}) in {time.perf_counter() - t0:.1f} s")
    return model, cfg, info


def load_analysis_tokenizer(cfg, override: Optional[str] = None):
    """The tokenizer of a run (its config's `tokenizer`), or None for mock-data runs."""
    name = override or cfg.tokenizer
    if not name:
        return None
    from megatron.remoe.data.errors import DataError
    from megatron.remoe.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except DataError as e:
        raise AnalysisError(f"tokenizer {name}: {' '.join(str(e).split())}") from None


def default_data(cfg, split: str = "valid") -> tuple:
    """({domain: prefix} to analyse, [training prefixes]) from a run's config: its validation
    prefixes (`--valid-data-path`; named by their basename, as the trainer does), or, with
    split='test', the sibling `.../test/<domain>` prefixes of the demo data layout."""
    from megatron.remoe.arguments import parse_blend
    from megatron.remoe.datasets import _domain_names

    train = parse_blend(cfg.data_path, "data_path")[0] if cfg.data_path else []
    if not cfg.valid_data_path:
        raise AnalysisError("the checkpoint's config has no --valid-data-path; give the data to "
                            "analyse with --data DOMAIN=PREFIX ...")
    prefixes = parse_blend(cfg.valid_data_path, "valid_data_path")[0]
    if split == "test":
        out = []
        for p in prefixes:
            parent, name = os.path.split(p)
            root, sub = os.path.split(parent)
            t = os.path.join(root, "test", name)
            if sub != "valid" or not os.path.isfile(t + ".idx"):
                raise AnalysisError(f"no test split next to {p} (expected {t}.bin/.idx); use "
                                    "--data DOMAIN=PREFIX ...")
            out.append(t)
        prefixes = out
    return dict(zip(_domain_names(prefixes), prefixes)), train
