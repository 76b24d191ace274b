"""Offline routing analysis of trained (ReLU or TopK) MoE checkpoints: paper Figs. 7, 9 and 12.

Pipeline (each stage is a plain function, usable on an in-memory model):

    eval tokens      `tokens.make_eval_tokens(domain -> prefix, tokens_per_domain, seq_length)`
    token frequency  `frequency.token_frequencies(train prefixes, vocab_size)`
    capture          `capture.capture_routing(model, eval_tokens)` -> `RoutingCapture` (routing map
                     of every MoE layer for every analysed token; eval mode, no grad, forward hooks
                     on the routers)
    statistics       pure numpy on routing maps: `summary` (`layer_summary`, `flip_rates`),
                     `frequency` (`experts_by_frequency`), `specialisation`
                     (`domain_expert_share`, `active_experts_by_domain`, `top_tokens_per_expert`)
    figures          `figures.fig_*` return matplotlib Figures (Agg) with titles, axis labels,
                     legends or colorbars (`figure_problems` checks that)
    report           `report.write_report(out_dir, ...)`: PNGs, the CSV behind each figure, report.md
    everything       `pipeline.analyze(models, eval_tokens, ...)`

`checkpoint.load_checkpoint_model(path)` is the checkpoint front end (training.checkpointing.offline's
loader): the model of any saved parallel layout as a single-process fp32 model. The CLI is
`tools/analyze_routing.py`.

Conventions: a routing map is a bool array `[L, N, E]` (MoE layers x analysed tokens x experts),
True where the token is dispatched to the expert. ReLU routers route to 0..E experts, TopK to k.
"""

from megatron.remoe.analysis.capture import RoutingCapture, capture_routing, moe_routers
from megatron.remoe.analysis.checkpoint import load_analysis_tokenizer, load_checkpoint_model
from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.analysis.figures import (
    fig_active_experts,
    fig_domain_share,
    fig_expert_load,
    fig_experts_vs_frequency,
    fig_flip_rate,
    figure_problems,
    have_matplotlib,
    pyplot,
)
from megatron.remoe.analysis.frequency import (
    experts_by_frequency,
    frequency_ranks,
    log_rank_buckets,
    token_frequencies,
)
from megatron.remoe.analysis.pipeline import analyze
from megatron.remoe.analysis.report import (
    AnalysisResult,
    prepare_out_dir,
    token_text,
    write_report,
)
from megatron.remoe.analysis.specialisation import (
    active_experts_by_domain,
    domain_expert_share,
    top_tokens_per_expert,
)
from megatron.remoe.analysis.summary import flip_rates, layer_summary, routing_stats
from megatron.remoe.analysis.tokens import (
    EvalTokens,
    default_data,
    make_eval_tokens,
    read_domain_tokens,
)

__all__ = [
    "AnalysisError", "AnalysisResult", "EvalTokens", "RoutingCapture", "active_experts_by_domain",
    "analyze", "capture_routing", "default_data", "load_analysis_tokenizer",
    "load_checkpoint_model", "moe_routers",
    "domain_expert_share", "experts_by_frequency", "fig_active_experts", "fig_domain_share",
    "fig_expert_load", "fig_experts_vs_frequency", "fig_flip_rate", "figure_problems",
    "flip_rates", "frequency_ranks", "have_matplotlib", "pyplot", "layer_summary", "log_rank_buckets",
    "make_eval_tokens", "prepare_out_dir", "read_domain_tokens", "routing_stats",
    "token_frequencies", "token_text", "top_tokens_per_expert", "write_report",
]
