"""Training configuration: one dataclass, Megatron-style flags and YAML files with the same keys.

Every feature of the trainer sits behind a field of `TrainConfig` (torchtitan style). The flag of a
field is its name with dashes (`micro_batch_size` -> `--micro-batch-size`); a YAML file may spell keys
either way. Precedence: dataclass defaults < `--config FILE.yaml` (and its `base:` chain) < flags.

`parse_config(argv)` returns a validated config or raises `ConfigError` with one line naming the value
and the fix; `pretrain.main` turns that into exit code 2 before anything is written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatron.remoe.config import ROUTERS, ConfigError

GROUPS = ("model", "moe", "parallel", "batch", "optimizer", "training", "data", "checkpoint",
          "logging")


def _f(default, help: str, group: str, **argparse_kwargs):
    """A config field with its flag help text, argparse group and extra argparse options."""
    factory = isinstance(default, list)
    meta = dict(help=help, group=group, argparse=argparse_kwargs)
    if factory:
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- model (LLaMA-style GPT: RMSNorm, SwiGLU, RoPE, untied embeddings, no biases) ----
    num_layers: Optional[int] = _f(None, "transformer layers (required)", "model")
    hidden_size: Optional[int] = _f(None, "hidden size (required)", "model")
    num_attention_heads: Optional[int] = _f(None, "attention heads (required)", "model")
    num_query_groups: Optional[int] = _f(None, "GQA groups (default: = heads, i.e. MHA)", "model")
    ffn_hidden_size: Optional[int] = _f(None, "FFN width of a dense MLP / one expert before "
                                        "granularity (default 4 * hidden)", "model")
    kv_channels: Optional[int] = _f(None, "head dim (default hidden / heads)", "model")
    seq_length: Optional[int] = _f(None, "sequence length in tokens (required)", "model")
    rotary_base: int = _f(1_000_000, "RoPE base", "model")
    init_method_std: float = _f(0.01, "init std of all weights (router included)", "model")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple of this "
                                           "(times TP)", "model")
    transformer_impl: str = _f("local", "layer implementation: megatron-core local modules or "
                               "Transformer Engine", "model", choices=["local", "transformer_engine"])
    bf16: bool = _f(False, "bf16 weights/activations with fp32 master weights (GPU, or CPU "
                    "with AVX512-BF16/AMX); router and lambda stay fp32", "model")
    recompute_granularity: Optional[str] = _f(
        None, "activation recomputation: 'full' (whole layers) or 'selective' (see "
        "--recompute-modules; ['moe'] recomputes only the MoE block)", "model",
        choices=["full", "selective"])
    recompute_method: str = _f("uniform", "with full recompute: uniform or block", "model",
                               choices=["uniform", "block"])
    recompute_num_layers: int = _f(1, "with full recompute: layers per recompute unit", "model")
    recompute_modules: list = _f([], "with selective recompute: modules, e.g. moe core_attn "
                                 "mlp moe_act layernorm", "model", nargs="+")

    # ---- MoE / router ----
    router: str = _f("relu", "router: relu (ReMoE), topk (softmax top-k + aux loss), "
                     "topk-sigmoid-bias (aux-loss-free), dense (no MoE)", "moe",
                     choices=list(ROUTERS))
    moe_relu_routing: Optional[bool] = _f(None, "reference-implementation spelling of "
                                          "--router relu", "moe")
    num_experts: int = _f(8, "experts per MoE layer before granularity (E)", "moe")
    moe_router_topk: int = _f(1, "k: active experts per token of the equivalent TopK model; the "
                              "ReLU target sparsity is 1 - k/E", "moe")
    moe_granularity: int = _f(1, "G: E*G experts of width ffn/G, k*G active", "moe")
    moe_layer_freq: Any = _f(1, "MoE every N layers (int), or a 0/1 pattern like 1,0,1,0", "moe")
    moe_token_dispatcher_type: str = _f("alltoall", "token dispatcher", "moe",
                                        choices=["alltoall", "allgather"])
    moe_grouped_gemm: bool = _f(False, "grouped-GEMM experts (GPU, needs TE or grouped_gemm)",
                                "moe")
    moe_cpu_experts: str = _f("grouped", "expert module on CPU: grouped (one GEMM pass over all "
                              "experts, SequentialMLP's parameters and checkpoints) or sequential "
                              "(megatron-core's SequentialMLP); GPUs ignore it", "moe",
                              choices=["grouped", "sequential"])
    moe_aux_loss_coeff: float = _f(1e-2, "TopK aux (load-balancing) loss coefficient", "moe")
    moe_relu_l1_reg_coeff_init: float = _f(1e-8, "lambda_0 of the adaptive L1", "moe")
    moe_relu_l1_reg_coeff_multiplier: float = _f(1.2, "alpha: lambda update factor per step",
                                                 "moe")
    moe_relu_l1_reg_coeff_controller: str = _f(
        "paper", "lambda update rule: paper (alpha^sign(target - S)); ema, deadband or pi are "
        "steadier in Stage III on small batches (docs/training.md)", "moe",
        choices=["paper", "ema", "deadband", "pi"])
    moe_relu_l1_reg_coeff_ema_beta: float = _f(0.9, "ema rule: moving-average factor of the "
                                               "sparsity", "moe")
    moe_relu_l1_reg_coeff_deadband_z: float = _f(2.0, "deadband rule: hold lambda while |S - "
                                                 "target| <= z * sampling noise of S", "moe")
    moe_relu_l1_reg_coeff_pi_kp: float = _f(2.0, "pi rule: proportional gain on log lambda",
                                            "moe")
    moe_relu_l1_reg_coeff_pi_ki: float = _f(1.0, "pi rule: integral gain on log lambda", "moe")
    moe_relu_target_sparsity: Optional[float] = _f(None, "target sparsity (default 1 - k/E)",
                                                   "moe")
    moe_relu_no_load_balancing: bool = _f(False, "plain L1 (paper Eq. 9) instead of the "
                                          "load-balanced L1", "moe")
    moe_relu_warmup_max_experts: Optional[int] = _f(None, "Stage I memory bound: dispatch at "
                                                    "most this many experts per token until the "
                                                    "target is first reached", "moe")

    # ---- parallelism ----
    tensor_model_parallel_size: int = _f(1, "TP size", "parallel")
    pipeline_model_parallel_size: int = _f(1, "PP size", "parallel")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(
        None, "model chunks per pipeline rank (interleaved 1F1B)", "parallel")
    expert_model_parallel_size: int = _f(1, "EP size", "parallel")
    expert_tensor_parallel_size: Optional[int] = _f(None, "TP size inside experts "
                                                    "(default = TP)", "parallel")
    context_parallel_size: int = _f(1, "CP size", "parallel")
    sequence_parallel: bool = _f(False, "sequence parallel (required for MoE with TP > 1; "
                                 "ignored with TP = 1)", "parallel")
    use_distributed_optimizer: bool = _f(False, "shard optimizer state over data-parallel ranks",
                                         "parallel")
    overlap_grad_reduce: bool = _f(False, "overlap the DP gradient reduce with backward",
                                   "parallel")

    # ---- batch ----
    micro_batch_size: int = _f(1, "sequences per micro-batch per data-parallel rank", "batch")
    global_batch_size: Optional[int] = _f(None, "sequences per optimizer step (default micro "
                                          "batch * DP); must be divisible by micro batch * DP",
                                          "batch")

    # ---- optimizer and schedule (Adam, warm-up + decay) ----
    lr: float = _f(5e-4, "peak learning rate", "optimizer")
    min_lr: float = _f(5e-5, "final learning rate of the decay", "optimizer")
    lr_warmup_fraction: Optional[float] = _f(None, "warm-up as a fraction of the decay "
                                             "iterations (e.g. 0.01)", "optimizer")
    lr_warmup_iters: int = _f(0, "warm-up iterations (if no --lr-warmup-fraction)", "optimizer")
    lr_warmup_init: float = _f(0.0, "learning rate at the start of the warm-up", "optimizer")
    lr_decay_style: str = _f("cosine", "decay shape", "optimizer",
                             choices=["cosine", "linear", "constant", "inverse-square-root"])
    lr_decay_iters: Optional[int] = _f(None, "decay length (default --train-iters)", "optimizer")
    weight_decay: float = _f(0.01, "decoupled weight decay (not on norms)", "optimizer")
    adam_beta1: float = _f(0.9, "Adam beta1", "optimizer")
    adam_beta2: float = _f(0.999, "Adam beta2", "optimizer")
    adam_eps: float = _f(1e-8, "Adam epsilon", "optimizer")
    clip_grad: float = _f(1.0, "global gradient-norm clip (0 disables)", "optimizer")

    # ---- training loop ----
    train_iters: Optional[int] = _f(None, "optimizer steps (required)", "training")
    seed: int = _f(1234, "random seed (weights, data order)", "training")
    eval_interval: int = _f(1000, "evaluate every N steps (0: only at the end)", "training")
    eval_iters: int = _f(10, "global batches per evaluation and validation set (0 disables "
                         "evaluation)", "training")
    exit_interval: Optional[int] = _f(None, "stop (after saving) once the iteration is a "
                                      "multiple of this", "training")
    exit_duration_in_mins: Optional[float] = _f(None, "stop (after saving) at the first step "
                                                "boundary after this many minutes of wall time",
                                                "training")
    exit_signal_handler: bool = _f(True, "on SIGTERM or SIGUSR1 (SLURM's pre-timeout signal) save "
                                   "at the next step boundary and exit 0", "training")
    nan_policy: str = _f("stop", "a non-finite loss or gradient (detected on every rank "
                         "consistently): 'stop' (exit 3, nothing saved) or 'skip-step' (no "
                         "update; see --max-skipped-steps)", "training",
                         choices=["stop", "skip-step"])
    distributed_timeout_minutes: float = _f(10.0, "how long a collective waits for the other "
                                            "ranks before the run stops with an error (a dead "
                                            "or hung rank); counts from each collective",
                                            "training")
    max_skipped_steps: int = _f(10, "with --nan-policy skip-step: stop once more than this many "
                                "steps were skipped in total (counted across resumes)", "training")

    # ---- data ----
    data_path: list = _f([], "training data: prefix, or Megatron blend 'w1 prefix1 w2 prefix2 "
                         "...'", "data", nargs="+")
    valid_data_path: list = _f([], "validation data (same syntax); several prefixes are "
                               "evaluated one by one (per-domain losses)", "data", nargs="+")
    split: Optional[str] = _f(None, "without --valid-data-path: train/valid/test split of "
                              "--data-path, e.g. 969,30,1", "data")
    tokenizer: Optional[str] = _f(None, "'gpt2' or a tokenizer directory (required unless "
                                  "--mock-data)", "data")
    vocab_size: Optional[int] = _f(None, "with --mock-data: vocabulary size", "data")
    mock_data: bool = _f(False, "synthetic data (throughput / smoke tests)", "data")
    data_cache_path: Optional[str] = _f(None, "where GPTDataset index caches go (default: "
                                        "next to the data)", "data")
    num_workers: int = _f(0, "data-loader worker processes", "data")
    full_data_check: bool = _f(False, "before training, scan every token of the data for ids "
                               "outside the vocabulary (default: .bin files up to 256 MiB fully, "
                               "larger ones sampled)", "data")

    # ---- checkpoints ----
    save: Optional[str] = _f(None, "checkpoint directory", "checkpoint")
    save_interval: Optional[int] = _f(None, "save every N steps (and always at the end)",
                                      "checkpoint")
    load: Optional[str] = _f(None, "resume from the latest complete checkpoint in this "
                             "directory (nothing there: start fresh)", "checkpoint")
    no_load_optim: bool = _f(False, "do not restore the optimizer state", "checkpoint")
    no_load_rng: bool = _f(False, "do not restore RNG states", "checkpoint")
    keep_last_n_checkpoints: Optional[int] = _f(None, "keep only the N newest checkpoints that "
                                                "verify (older ones are deleted after each "
                                                "save; default: keep all)", "checkpoint")
    checkpoint_checksums: bool = _f(True, "record CRC32s of the checkpoint files and verify them "
                                    "before loading (sizes are always checked)", "checkpoint")

    # ---- logging ----
    log_interval: int = _f(10, "log every N steps", "logging")
    metrics_file: Optional[str] = _f(None, "JSONL metrics (one object per step; default "
                                     "<save>/metrics.jsonl when --save is set)", "logging")
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard log directory", "logging")
    wandb_project: Optional[str] = _f(None, "Weights & Biases project (WANDB_MODE=offline "
                                      "works)", "logging")
    wandb_exp_name: Optional[str] = _f(None, "W&B run name", "logging")
    wandb_save_dir: Optional[str] = _f(None, "W&B local directory", "logging")

    # ---- derived (not settable) ----
    @property
    def moe(self) -> bool:
        return self.router != "dense"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# Keys of a config file that are not config fields.
FILE_ONLY_KEYS = ("base",)


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
def _base_type(name: str):
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(prog: str = "remoe train") -> argparse.ArgumentParser:
    """Flags for every TrainConfig field. Defaults are SUPPRESSed so that only the flags actually
    given override the YAML file."""
    parser = argparse.ArgumentParser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Pretrain a ReMoE / TopK-MoE / dense GPT with megatron-core.")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML with the same keys as the flags (underscored or dashed); "
                             "flags override it; `base: other.yaml` inherits")
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _base_type(name)
        extra = dict(f.metadata["argparse"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} [default: {default}]"
        if kind is bool:
            # --x / --no-x; argparse would read a field named no_* as the negation of "--load-optim"
            action = "store_true" if name.startswith("no_") else argparse.BooleanOptionalAction
            groups[f.metadata["group"]].add_argument(flag, action=action, help=help_text)
            continue
        if name == "moe_layer_freq":
            extra["type"] = _parse_layer_freq
        elif kind in (int, float, str):
            extra.setdefault("type", kind)
        groups[f.metadata["group"]].add_argument(flag, help=help_text, **extra)
    return parser


def _parse_layer_freq(text):
    try:
        if isinstance(text, (int, list)):
            return text
        text = str(text).strip()
        if "," in text:
            return [int(x) for x in text.strip("[]").split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(f"moe_layer_freq={text!r} must be an int or a 0/1 pattern like "
                          "'1,0,1,0'") from None


def _raise_on_error(parser: argparse.ArgumentParser) -> None:
    # argparse prints usage and exits 2 on bad flags; we want our one-line error instead.
    def error(message):
        m = re.match(r"argument (\S+): invalid (int|float) value: (.*)$", message)
        if m:
            kind = "an integer" if m.group(2) == "int" else "a number"
            raise ConfigError(f"{m.group(1)}={m.group(3)}: invalid {m.group(2)} value; pass "
                              f"{kind} (see `{parser.prog} --help`)")
        raise ConfigError(f"{message}; see `{parser.prog} --help`")

    parser.error = error


# ------------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------------
def read_yaml_mapping(path: str, what: str = "config", fix: str = "fix the --config path",
                      error=ConfigError) -> dict:
    """The top-level mapping of YAML file `path`; `error` (one line, naming the file) otherwise."""
    if not os.path.isfile(path):
        raise error(f"{what} file {path} does not exist; {fix}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{what} {path}{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the file")
    if not isinstance(raw, dict):
        raise error(f"{what} {path}: expected a mapping of keys to values at top level")
    return raw


def load_yaml_config(path: str, _seen: Optional[set] = None) -> dict:
    """Read a config file, following `base:` (a path relative to the file, or a list of them,
    applied in order; the file's own keys win). Keys are normalised to underscores."""
    _seen = _seen or set()
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"config {path}: `base:` chain loops back to itself; fix the base keys")
    _seen = _seen | {real}
    raw = read_yaml_mapping(path)
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    merged: dict = {}
    bases = raw.pop("base", None)
    for base in ([bases] if isinstance(bases, str) else bases or []):
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged.update(load_yaml_config(base_path, _seen))
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        hint = _close_match(unknown[0])
        raise ConfigError(f"config {path}: unknown key {unknown[0]!r}"
                          + (f" (did you mean {hint!r}?)" if hint else "")
                          + "; remove it or fix the spelling")
    merged.update(raw)
    return merged


def _close_match(name: str) -> Optional[str]:
    import difflib

    match = difflib.get_close_matches(name, list(FIELDS), n=1)
    return match[0] if match else None


def _coerce(name: str, value):
    """YAML values to the field's type (PyYAML reads `5e-4` as a string, for instance)."""
    if value is None:
        return None
    kind = _base_type(name)
    try:
        if name == "moe_layer_freq":
            return _parse_layer_freq(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if kind is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else \
                str(value).split()
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {getattr(kind, '__name__', kind)}; "
                          f"fix the value of {name}") from None
    return value


def config_to_yaml(cfg: TrainConfig) -> str:
    """The effective config as YAML (loadable with --config; round-trips exactly)."""
    lines = []
    data = cfg.to_dict()
    for group in GROUPS:
        lines.append(f"# {group}")
        for name, f in FIELDS.items():
            if f.metadata["group"] == group:
                lines.append(yaml.safe_dump({name: data[name]}, default_flow_style=False,
                                            width=1000, sort_keys=False).strip())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Parse + validate
# ------------------------------------------------------------------------------------------------
def parse_config(argv: Optional[list] = None, world_size: Optional[int] = None,
                 cuda: Optional[bool] = None, prog: str = "remoe train") -> TrainConfig:
    """defaults < YAML < flags, then `validate`. Raises ConfigError (one line) on any problem."""
    parser = build_parser(prog)
    _raise_on_error(parser)
    args = vars(parser.parse_args(argv))
    values: dict = {}
    config_path = args.pop("config", None)
    if config_path:
        values.update(load_yaml_config(config_path))
    values.update(args)
    values = {k: _coerce(k, v) for k, v in values.items()}
    cfg = TrainConfig(**values)
    return finalize_config(cfg, world_size, cuda)


def finalize_config(cfg: TrainConfig, world_size: Optional[int] = None,
                    cuda: Optional[bool] = None) -> TrainConfig:
    """Resolve the spellings/defaults that depend on other fields, then validate."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cfg.moe_relu_routing is True and cfg.router != "relu":
        raise ConfigError(f"--moe-relu-routing contradicts --router {cfg.router}; drop one of them")
    if cfg.moe_relu_routing is False and cfg.router == "relu":
        raise ConfigError("--no-moe-relu-routing with --router relu: choose a router with "
                          "--router topk|topk-sigmoid-bias|dense")
    cfg.moe_relu_routing = cfg.router == "relu"
    if cfg.hidden_size and cfg.ffn_hidden_size is None:
        cfg.ffn_hidden_size = 4 * cfg.hidden_size
    if cfg.num_attention_heads and cfg.num_query_groups is None:
        cfg.num_query_groups = cfg.num_attention_heads
    if cfg.tensor_model_parallel_size == 1:
        cfg.sequence_parallel = False  # a no-op with one TP rank (as in Megatron-LM)
    if cfg.save and cfg.metrics_file is None:
        cfg.metrics_file = os.path.join(cfg.save, "metrics.jsonl")
    validate(cfg, world_size, cuda)
    if cfg.global_batch_size is None:
        cfg.global_batch_size = cfg.micro_batch_size * data_parallel_size(cfg, world_size)
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters
    return cfg


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    return world_size // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
                          * cfg.context_parallel_size)


def num_micro_batches(cfg: TrainConfig, world_size: int) -> int:
    return cfg.global_batch_size // (cfg.micro_batch_size * data_parallel_size(cfg, world_size))


def validate(cfg: TrainConfig, world_size: int, cuda: bool) -> None:
    """Every contradiction we can detect before touching a GPU or the disk (one-line errors)."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name} is required; set --{name.replace('_', '-')} (or "
                              f"{name}: in the --config file)")
    positive = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "seq_length", "train_iters", "micro_batch_size",
                "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "expert_model_parallel_size", "context_parallel_size", "log_interval",
                "moe_granularity")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    tp, pp, cp, ep = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                      cfg.context_parallel_size, cfg.expert_model_parallel_size)
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
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by TP*PP*CP = {tp * pp * cp};"
                          " change the parallel sizes or the number of processes")
    dp = data_parallel_size(cfg, world_size)
    mbs = cfg.micro_batch_size
    gbs = cfg.global_batch_size if cfg.global_batch_size is not None else mbs * dp
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
    if cfg.moe:
        E, k = cfg.num_experts, cfg.moe_router_topk
        if E < 1:
            raise ConfigError(f"num_experts={E} must be >= 1 for router {cfg.router}; use "
                              "--router dense for a model without experts")
        if not 1 <= k <= E:
            raise ConfigError(f"moe_router_topk={k} must be in [1, num_experts={E}]; lower "
                              "--moe-router-topk or raise --num-experts")
        if (E * cfg.moe_granularity) % ep:
            raise ConfigError(f"num_experts * granularity = {E * cfg.moe_granularity} is not "
                              f"divisible by expert_model_parallel_size={ep}; change EP or E")
        if tp > 1 and not cfg.sequence_parallel:
            raise ConfigError(f"MoE with tensor_model_parallel_size={tp} needs sequence parallel;"
                              " add --sequence-parallel")
        etp = cfg.expert_tensor_parallel_size or tp
        if (dp * tp * cp) % (ep * etp):
            raise ConfigError(f"EP*ETP = {ep}*{etp} must divide DP*TP*CP = {dp}*{tp}*{cp}; change "
                              "--expert-model-parallel-size or the number of processes")
        if cfg.moe_grouped_gemm and not cuda:
            raise ConfigError("moe_grouped_gemm needs a GPU; drop --moe-grouped-gemm on CPU")
    elif ep > 1:
        raise ConfigError(f"expert_model_parallel_size={ep} with --router dense (no experts); "
                          "set it to 1")
    if cfg.bf16 and not cuda:
        from megatron.remoe.cpu_settings import cpu_bf16_supported

        if not cpu_bf16_supported():
            raise ConfigError("bf16 on CPU needs native bf16 arithmetic (AVX512-BF16 or AMX), "
                              "which this CPU lacks; pass --no-bf16 on this machine")
    if cfg.transformer_impl == "transformer_engine":
        from megatron.remoe.spec import have_transformer_engine

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
    # optimizer / schedule
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
    # data
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
    # stopping and numerical guards
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
    # checkpoints
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
    if cfg.metrics_file:
        if os.path.isdir(cfg.metrics_file):
            raise ConfigError(f"metrics_file={cfg.metrics_file} is a directory; fix: pass a file "
                              "path to --metrics-file")
        check_output_dir(os.path.dirname(os.path.abspath(cfg.metrics_file)), "metrics_file")
    if cfg.load and os.path.exists(cfg.load) and not os.path.isdir(cfg.load):
        raise ConfigError(f"load={cfg.load} is not a directory; fix: pass the --save directory "
                          "of the run to resume (it holds iter_XXXXXXX/ and the tracker)")
    # the model config itself (megatron-core and ReMoE checks), built without any process group
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
    import tempfile

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


def parse_blend(items: list, name: str = "data_path") -> tuple[list, Optional[list]]:
    """Megatron blend syntax: `prefix` | `p1 p2 ...` | `w1 p1 w2 p2 ...` -> (prefixes, weights)."""
    items = [str(x) for x in items]

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) > 1 and is_number(items[0]):
        if len(items) % 2:
            raise ConfigError(f"{name}: a weighted blend needs 'weight prefix' pairs, got "
                              f"{len(items)} items; fix the list")
        weights, prefixes = items[0::2], items[1::2]
        if not all(is_number(w) for w in weights) or any(is_number(p) for p in prefixes):
            raise ConfigError(f"{name}: expected 'w1 prefix1 w2 prefix2 ...', got {items}")
        weights = [float(w) for w in weights]
        for weight, prefix in zip(weights, prefixes):
            if not weight > 0:  # zero or negative: megatron-core would fail deep in the builder
                raise ConfigError(f"{name}: blend weight {weight:g} of {prefix} must be > 0; fix: "
                                  "give it a positive weight or drop the prefix from the blend")
        return prefixes, weights
    if any(is_number(p) for p in items):
        raise ConfigError(f"{name}: mix of weights and prefixes {items}; use 'w1 p1 w2 p2 ...'")
    return items, None


# ------------------------------------------------------------------------------------------------
# TrainConfig -> megatron-core TransformerConfig
# ------------------------------------------------------------------------------------------------
def transformer_config(cfg: TrainConfig, use_cpu_initialization: bool):
    """The ReMoETransformerConfig of this run (LLaMA defaults + router preset from model.py)."""
    import torch

    from megatron.remoe.model import build_transformer_config

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    fields = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.kv_channels,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        bf16=cfg.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=cfg.recompute_num_layers if cfg.recompute_granularity == "full"
        else None,
        # Megatron-LM's training defaults for the schedules
        deallocate_pipeline_outputs=True, calculate_per_token_loss=False,
    )
    if cfg.recompute_modules:
        fields["recompute_modules"] = list(cfg.recompute_modules)
    if cfg.moe:
        fields.update(
            expert_model_parallel_size=cfg.expert_model_parallel_size,
            expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
            moe_layer_freq=cfg.moe_layer_freq,
            moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
            moe_grouped_gemm=cfg.moe_grouped_gemm,
            moe_cpu_experts=cfg.moe_cpu_experts,
            moe_router_dtype="fp32")
        if cfg.router == "relu":
            fields.update(
                moe_relu_l1_reg_coeff_init=cfg.moe_relu_l1_reg_coeff_init,
                moe_relu_l1_reg_coeff_multiplier=cfg.moe_relu_l1_reg_coeff_multiplier,
                moe_relu_l1_reg_coeff_controller=cfg.moe_relu_l1_reg_coeff_controller,
                moe_relu_l1_reg_coeff_ema_beta=cfg.moe_relu_l1_reg_coeff_ema_beta,
                moe_relu_l1_reg_coeff_deadband_z=cfg.moe_relu_l1_reg_coeff_deadband_z,
                moe_relu_l1_reg_coeff_pi_kp=cfg.moe_relu_l1_reg_coeff_pi_kp,
                moe_relu_l1_reg_coeff_pi_ki=cfg.moe_relu_l1_reg_coeff_pi_ki,
                moe_relu_target_sparsity=cfg.moe_relu_target_sparsity,
                moe_relu_load_balancing=not cfg.moe_relu_no_load_balancing,
                moe_relu_warmup_max_experts=cfg.moe_relu_warmup_max_experts)
    return build_transformer_config(
        router=cfg.router, num_experts=cfg.num_experts if cfg.moe else None,
        moe_router_topk=cfg.moe_router_topk, moe_granularity=cfg.moe_granularity,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, **fields)
