"""Everything in one call: capture the routing of in-memory models on the same tokens and write
the report."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from megatron.remoe.analysis.capture import capture_routing
from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.analysis.report import AnalysisResult, write_report
from megatron.remoe.analysis.summary import flip_rates
from megatron.remoe.analysis.tokens import EvalTokens


def analyze(models: Sequence, eval_tokens: EvalTokens, out_dir: str, tokenizer=None,
            freq_counts: Optional[np.ndarray] = None, freq_source: str = "",
            compare: Optional[dict] = None, vocab_size: Optional[int] = None,
            batch_size: int = 8, num_buckets: int = 12, top: int = 10, figures: bool = True,
            meta: Optional[dict] = None) -> AnalysisResult:
    """Analyse in-memory models on the same tokens and write the report.

    models: [(label, model)] or [(label, model, info dict)];
    compare: {label: (other label, other model)} -> flip rates of `label` against the other model;
    freq_counts: token counts of the training split ([vocab]); None = count the analysed tokens.
    """
    t0 = time.perf_counter()
    captures = []
    for item in models:
        label, model = item[0], item[1]
        cap = capture_routing(model, eval_tokens, label, batch_size=batch_size)
        if len(item) > 2:
            cap.info.update(item[2])
        captures.append(cap)
    flips = []
    for label, (other_label, other_model) in (compare or {}).items():
        base = next((c for c in captures if c.label == label), None)
        if base is None:
            raise AnalysisError(f"compare: no model labelled {label}")
        other = capture_routing(other_model, eval_tokens, other_label, batch_size=batch_size)
        flips.append((label, other_label, flip_rates(base, other)))
    if freq_counts is None:
        V = vocab_size or int(eval_tokens.token_ids.max()) + 1
        freq_counts = np.bincount(eval_tokens.token_ids, minlength=V)
        freq_source = freq_source or "the analysed tokens (no training split given)"
    result = write_report(out_dir, captures, freq_counts, tokenizer, flips, freq_source,
                          num_buckets, top, figures, meta)
    result.seconds = time.perf_counter() - t0
    return result


