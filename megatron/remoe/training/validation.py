"""The rules of a training configuration: every contradiction found before touching a GPU or the disk.

`finalize_config` resolves the defaults that depend on other fields, then `validate` checks the
`TrainConfig` one config group at a time (each `check_*` below raises a one-line `ConfigError` naming
the value and the fix). The ReMoE-specific ranges (k vs E, lambda_0, alpha) belong to config.py,
which the ReMoETransformerConfig built last (`check_model_config`) and the ablation tool also use.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from megatron.remoe.config import check_topk_range, default_ffn_hidden_size
from megatron.remoe.cpu.settings import cpu_bf16_supported
from megatron.remoe.elastic import check_elastic
from megatron.remoe.errors import ConfigError
from megatron.remoe.training.config import TrainConfig, data_parallel_size, transformer_config

REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters")
POSITIVE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "seq_length", "train_iters", "micro_batch_size",
            "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "expert_model_parallel_size", "context_parallel_size", "log_interval",
            "moe_granularity")


def finalize_config(cfg: TrainConfig, world_size: Optional[int] = None,
                    cuda: Optional[bool] = None) -> TrainConfig:
    """Resolve the spellings/defaults that depend on other fields, then validate."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        cuda = torch.cuda.is_available()
    _resolve_field_defaults(cfg)
    validate(cfg, world_size, cuda)
    _resolve_schedule_defaults(cfg, world_size)
    return cfg


def resolve_derived(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The defaults finalize_config fills in (FFN width 4h, query groups = heads, metrics file in
    --save, global batch = micro batch * DP, decay length = --train-iters), without validating:
    for tools that read a saved config.yaml of a run that already passed validation."""
    _resolve_field_defaults(cfg)
    _resolve_schedule_defaults(cfg, world_size)
    return cfg


def _resolve_field_defaults(cfg: TrainConfig) -> None:
    """The router spelling and the defaults that follow from other fields (before validation)."""
    if cfg.moe_relu_routing is True and cfg.router != "relu":
        raise ConfigError(f"--moe-relu-routing contradicts --router {cfg.router}; drop one of them")
    if cfg.moe_relu_routing is False and cfg.router == "relu":
        raise ConfigError("--no-moe-relu-routing with --router relu: choose a router with "
                          "--router topk|topk-sigmoid-bias|dense")
    cfg.moe_relu_routing = cfg.router == "relu"
    if cfg.hidden_size and cfg.ffn_hidden_size is None:
        cfg.ffn_hidden_size = default_ffn_hidden_size(cfg.hidden_size)
    if cfg.num_attention_heads and cfg.num_query_groups is None:
        cfg.num_query_groups = cfg.num_attention_heads
    if cfg.tensor_model_parallel_size == 1:
        cfg.sequence_parallel = False  # a no-op with one TP rank (as in Megatron-LM)
    if cfg.save and cfg.metrics_file is None:
        cfg.metrics_file = os.path.join(cfg.save, "metrics.jsonl")


def _resolve_schedule_defaults(cfg: TrainConfig, world_size: int) -> None:
    """Global batch and decay length (after validation, which checks them with these defaults)."""
    if cfg.global_batch_size is None:
        cfg.global_batch_size = cfg.micro_batch_size * data_parallel_size(cfg, world_size)
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters


def validate(cfg: TrainConfig, world_size: int, cuda: bool) -> None:
    """Every contradiction we can detect before touching a GPU or the disk (one-line errors).
    The groups run in this order, so the first error reported is the same whatever else is wrong."""
    check_required(cfg)
    check_model(cfg)
    check_parallelism(cfg, world_size)
    check_moe(cfg, world_size, cuda)
    check_implementation(cfg, cuda)
    check_optimizer(cfg)
    check_data(cfg)
    check_stopping(cfg)
    check_saving(cfg)
    check_logging(cfg)
    check_loading(cfg)
    check_model_config(cfg, cuda)


def check_required(cfg: TrainConfig) -> None:
    """The fields without a default are set, and the sizes and counts are >= 1."""
    for name in REQUIRED:
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name} is required; set --{name.replace('_', '-')} (or "
                              f"{name}: in the --config file)")
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")


def check_model(cfg: TrainConfig) -> None:
    """Attention heads, query groups and head size fit together and split over TP."""
    tp = cfg.tensor_model_parallel_size
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    if heads % tp:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by "
                          f"tensor_model_parallel_size={tp}; pick a TP size that divides it")
    if heads % groups:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by num_query_groups="
                          f"{groups}; pick a group count that divides the heads")
    if groups % tp:
        raise ConfigError(f"num_query_groups={groups} is not divisible by "
                          f"tensor_model_parallel_size={tp}; use more groups or a smaller TP")
    if cfg.kv_channels is None and cfg.hidden_size % heads:
        raise ConfigError(f"hidden_size={cfg.hidden_size} is not divisible by "
                          f"num_attention_heads={heads}; set --kv-channels or change the sizes")


def _global_batch(cfg: TrainConfig, world_size: int) -> int:
    """The global batch size, defaulting (before finalize_config sets it) to micro batch * DP."""
    dp = data_parallel_size(cfg, world_size)
    return cfg.global_batch_size if cfg.global_batch_size is not None else \
        cfg.micro_batch_size * dp


def check_parallelism(cfg: TrainConfig, world_size: int) -> None:
    """The world splits into TP * PP * CP * DP; batches, layers and sequences split accordingly."""
    tp, pp, cp = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                  cfg.context_parallel_size)
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by TP*PP*CP = {tp * pp * cp};"
                          " change the parallel sizes or the number of processes")
    dp = data_parallel_size(cfg, world_size)
    mbs = cfg.micro_batch_size
    gbs = _global_batch(cfg, world_size)
    if gbs % (mbs * dp):
        raise ConfigError(f"global_batch_size={gbs} is not divisible by micro_batch_size * DP = "
                          f"{mbs} * {dp}; use a multiple of {mbs * dp}")
    vp = cfg.virtual_pipeline_model_parallel_size
    if vp is not None:
        if pp < 2 or vp < 2:
            raise ConfigError(f"virtual_pipeline_model_parallel_size={vp} needs >= 2 chunks and "
                              "pipeline_model_parallel_size >= 2; unset it or raise PP/VP")
        if (gbs // (mbs * dp)) % pp:
            raise ConfigError(f"interleaved pipeline needs the number of micro-batches "
                              f"({gbs // (mbs * dp)}) divisible by PP={pp}; change the batch sizes")
    if cfg.num_layers % (pp * (vp or 1)):
        raise ConfigError(f"num_layers={cfg.num_layers} is not divisible by PP * VP = "
                          f"{pp * (vp or 1)}; change the layer count or the pipeline sizes")
    if cfg.seq_length % (2 * cp if cp > 1 else 1):
        raise ConfigError(f"seq_length={cfg.seq_length} must be divisible by 2 * CP = {2 * cp} "
                          "(load-balanced context parallel)")
    if cfg.sequence_parallel and cfg.seq_length % tp:
        raise ConfigError(f"seq_length={cfg.seq_length} is not divisible by TP={tp} (sequence "
                          "parallel splits it); change one of them")


def check_moe(cfg: TrainConfig, world_size: int, cuda: bool) -> None:
    """Experts and k make sense for the router and split over expert parallelism."""
    tp, cp, ep = (cfg.tensor_model_parallel_size, cfg.context_parallel_size,
                  cfg.expert_model_parallel_size)
    if not cfg.moe:
        if ep > 1:
            raise ConfigError(f"expert_model_parallel_size={ep} with --router dense (no experts); "
                              "set it to 1")
        return
    E, k = cfg.num_experts, cfg.moe_router_topk
    if E < 1:
        raise ConfigError(f"num_experts={E} must be >= 1 for router {cfg.router}; use "
                          "--router dense for a model without experts")
    check_topk_range(k, E)
    if (E * cfg.moe_granularity) % ep:
        raise ConfigError(f"num_experts * granularity = {E * cfg.moe_granularity} is not "
                          f"divisible by expert_model_parallel_size={ep}; change EP or E")
    if tp > 1 and not cfg.sequence_parallel:
        raise ConfigError(f"MoE with tensor_model_parallel_size={tp} needs sequence parallel;"
                          " add --sequence-parallel")
    dp = data_parallel_size(cfg, world_size)
    etp = cfg.expert_tensor_parallel_size or tp
    if (dp * tp * cp) % (ep * etp):
        raise ConfigError(f"EP*ETP = {ep}*{etp} must divide DP*TP*CP = {dp}*{tp}*{cp}; change "
                          "--expert-model-parallel-size or the number of processes")
    if cfg.moe_grouped_gemm and not cuda:
        raise ConfigError("moe_grouped_gemm needs a GPU; drop --moe-grouped-gemm on CPU")
    check_elastic(cfg)


def check_implementation(cfg: TrainConfig, cuda: bool) -> None:
    """This machine can run the chosen precision and layer implementation; recompute is coherent."""
    if cfg.bf16 and not cuda:
        if not cpu_bf16_supported():
            raise ConfigError("bf16 on CPU needs native bf16 arithmetic (AVX512-BF16 or AMX), "
                              "which this CPU lacks; pass --no-bf16 on this machine")
    if cfg.transformer_impl == "transformer_engine":
        from megatron.remoe.spec import have_transformer_engine  # noqa: PLC0415 -- spec loads the layer specs; flag parsing does not need them

        if not have_transformer_engine():
            raise ConfigError("transformer_impl=transformer_engine but Transformer Engine is not "
                              "installed; pip install the [gpu] extra or use --transformer-impl "
                              "local")
    if cfg.recompute_granularity == "selective" and not cfg.recompute_modules:
        raise ConfigError("recompute_granularity=selective needs --recompute-modules (e.g. moe)")
    if cfg.recompute_modules and cfg.recompute_granularity != "selective":
        raise ConfigError("--recompute-modules only applies with --recompute-granularity "
                          "selective; add it or drop the modules")
    if cfg.context_parallel_size > 1 and cfg.transformer_impl != "transformer_engine":
        raise ConfigError("context parallel needs Transformer Engine attention; use "
                          "--transformer-impl transformer_engine or --context-parallel-size 1")


def check_optimizer(cfg: TrainConfig) -> None:
    """Learning rates, clipping and the warm-up / decay schedule."""
    if cfg.lr <= 0:
        raise ConfigError(f"lr={cfg.lr} must be > 0; set --lr to a positive value")
    if cfg.clip_grad < 0:
        raise ConfigError(f"clip_grad={cfg.clip_grad} must be >= 0 (0 disables clipping)")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr={cfg.min_lr} is above lr={cfg.lr}; lower --min-lr")
    if cfg.lr_warmup_fraction is not None and cfg.lr_warmup_iters:
        raise ConfigError("set only one of --lr-warmup-fraction and --lr-warmup-iters")
    if cfg.lr_warmup_fraction is not None and not 0 <= cfg.lr_warmup_fraction < 1:
        raise ConfigError(f"lr_warmup_fraction={cfg.lr_warmup_fraction} must be in [0, 1)")
    decay = cfg.lr_decay_iters or cfg.train_iters
    if cfg.lr_warmup_iters >= decay and cfg.lr_decay_style != "constant":
        raise ConfigError(f"lr_warmup_iters={cfg.lr_warmup_iters} must be below the decay length "
                          f"{decay}; shorten the warm-up")


def check_data(cfg: TrainConfig) -> None:
    """Mock data or real data with a tokenizer; blends parse; every prefix has .bin/.idx files;
    evaluation counts."""
    if cfg.mock_data:
        if cfg.data_path:
            raise ConfigError("--mock-data and --data-path are exclusive; drop one")
        if not (cfg.vocab_size or cfg.tokenizer):
            raise ConfigError("--mock-data needs --vocab-size (or --tokenizer)")
    else:
        if not cfg.data_path:
            raise ConfigError("no training data: set --data-path PREFIX (or a blend "
                              "'w1 p1 w2 p2'), or --mock-data")
        if not cfg.tokenizer:
            raise ConfigError("--tokenizer is required with --data-path ('gpt2' or the "
                              "tokenizer directory the data was preprocessed with)")
        parse_blend(cfg.data_path, "data_path")
        if cfg.valid_data_path:
            parse_blend(cfg.valid_data_path, "valid_data_path")
            if cfg.split:
                raise ConfigError("--split and --valid-data-path are exclusive; drop one")
        for name in ("data_path", "valid_data_path"):
            prefixes, _ = parse_blend(getattr(cfg, name), name) if getattr(cfg, name) else ([], 0)
            for prefix in prefixes:
                if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
                    raise ConfigError(f"{name}: {prefix}.bin/.idx not found; fix the prefix or "
                                      "preprocess the data (tools/preprocess_data.py)")
    if cfg.eval_iters < 0 or cfg.eval_interval < 0:
        raise ConfigError("eval_iters and eval_interval must be >= 0")


def check_stopping(cfg: TrainConfig) -> None:
    """Early-exit settings and the numerical / collective guards."""
    if cfg.exit_interval is not None and cfg.exit_interval < 1:
        raise ConfigError(f"exit_interval={cfg.exit_interval} must be >= 1; drop --exit-interval "
                          "to train to --train-iters")
    if cfg.exit_duration_in_mins is not None and not cfg.exit_duration_in_mins > 0:
        raise ConfigError(f"exit_duration_in_mins={cfg.exit_duration_in_mins} must be > 0; "
                          "drop the flag for no time limit")
    if not cfg.distributed_timeout_minutes > 0:
        raise ConfigError(f"distributed_timeout_minutes={cfg.distributed_timeout_minutes} must be "
                          "> 0; set --distributed-timeout-minutes to a positive value (default 10)")
    if cfg.max_skipped_steps < 0:
        raise ConfigError(f"max_skipped_steps={cfg.max_skipped_steps} must be >= 0; set "
                          "--max-skipped-steps 0 (stop at the first non-finite step) or more")


def check_saving(cfg: TrainConfig) -> None:
    """Save interval and retention need --save; the save directory is writable."""
    if cfg.save_interval is not None and cfg.save_interval < 1:
        raise ConfigError(f"save_interval={cfg.save_interval} must be >= 1")
    if cfg.save_interval and not cfg.save:
        raise ConfigError("--save-interval without --save; add --save DIR")
    if cfg.keep_last_n_checkpoints is not None:
        if cfg.keep_last_n_checkpoints < 1:
            raise ConfigError(f"keep_last_n_checkpoints={cfg.keep_last_n_checkpoints} must be "
                              ">= 1 (the last good checkpoint is always kept); drop the flag to "
                              "keep all")
        if not cfg.save:
            raise ConfigError("--keep-last-n-checkpoints without --save; add --save DIR")
    if cfg.save:
        check_output_dir(cfg.save, "save")


def check_logging(cfg: TrainConfig) -> None:
    """The metrics file is a file in a writable directory."""
    if cfg.metrics_file:
        if os.path.isdir(cfg.metrics_file):
            raise ConfigError(f"metrics_file={cfg.metrics_file} is a directory; fix: pass a file "
                              "path to --metrics-file")
        check_output_dir(os.path.dirname(os.path.abspath(cfg.metrics_file)), "metrics_file")


def check_loading(cfg: TrainConfig) -> None:
    """--load names a directory (a missing one means: start fresh)."""
    if cfg.load and os.path.exists(cfg.load) and not os.path.isdir(cfg.load):
        raise ConfigError(f"load={cfg.load} is not a directory; fix: pass the --save directory "
                          "of the run to resume (it holds iter_XXXXXXX/ and the tracker)")


def check_model_config(cfg: TrainConfig, cuda: bool) -> None:
    """The model config itself (megatron-core's and ReMoE's checks), built without any process
    group; megatron-core's assertions become one-line ConfigErrors."""
    try:
        transformer_config(cfg, use_cpu_initialization=not cuda)
    except ConfigError:
        raise
    except (AssertionError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"invalid model configuration: {msg}") from None


def check_output_dir(path: str, name: str) -> None:
    """ConfigError unless directory `path` exists and is writable or can be created. Writes
    nothing into an existing `path`; a missing one is probed by creating (and removing) a
    temporary directory in its nearest existing parent."""
    flag = "--" + name.replace("_", "-")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{name}={path} exists and is not a directory; fix: point {flag} at "
                              "a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{name}={path} is not writable; fix: choose a writable {flag} "
                              "directory or fix its permissions")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{name}={path} cannot be created: {parent} is a file; fix: choose "
                          f"another {flag} directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".remoe-write-test-", dir=parent))
    except OSError as e:
        raise ConfigError(f"{name}={path} cannot be created: {parent} is not writable "
                          f"({e.strerror}); fix: choose a writable {flag} directory") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_blend(items: list, name: str = "data_path") -> tuple[list, Optional[list]]:
    """Megatron blend syntax: `prefix` | `p1 p2 ...` | `w1 p1 w2 p2 ...` -> (prefixes, weights)."""
    items = [str(x) for x in items]
    if len(items) > 1 and _is_number(items[0]):
        if len(items) % 2:
            raise ConfigError(f"{name}: a weighted blend needs 'weight prefix' pairs, got "
                              f"{len(items)} items; fix the list")
        weights, prefixes = items[0::2], items[1::2]
        if not all(_is_number(w) for w in weights) or any(_is_number(p) for p in prefixes):
            raise ConfigError(f"{name}: expected 'w1 prefix1 w2 prefix2 ...', got {items}")
        weights = [float(w) for w in weights]
        for weight, prefix in zip(weights, prefixes):
            if not weight > 0:  # zero or negative: megatron-core would fail deep in the builder
                raise ConfigError(f"{name}: blend weight {weight:g} of {prefix} must be > 0; fix: "
                                  "give it a positive weight or drop the prefix from the blend")
        return prefixes, weights
    if any(_is_number(p) for p in items):
        raise ConfigError(f"{name}: mix of weights and prefixes {items}; use 'w1 p1 w2 p2 ...'")
    return items, None
