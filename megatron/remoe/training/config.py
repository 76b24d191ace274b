"""The training configuration: one dataclass, `TrainConfig`, and what follows from it directly.

Every feature of the trainer sits behind a field of `TrainConfig` (torchtitan style); each field
carries its flag help text and argparse group (arguments.py builds the flags and reads YAML files,
validation.py holds the rules). Also here: the data-parallel size and micro-batch count of a run and
its megatron-core TransformerConfig (`transformer_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron.remoe.config import ROUTERS
from megatron.remoe.lambda_rules import (
    CONTROLLERS,
    PAPER_L1_COEFF_INIT,
    PAPER_L1_COEFF_MULTIPLIER,
    ControllerOptions,
)

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
    # the lambda controller: defaults and rule names from megatron/remoe/lambda_rules.py
    moe_relu_l1_reg_coeff_init: float = _f(PAPER_L1_COEFF_INIT, "lambda_0 of the adaptive L1",
                                           "moe")
    moe_relu_l1_reg_coeff_multiplier: float = _f(PAPER_L1_COEFF_MULTIPLIER,
                                                 "alpha: lambda update factor per step", "moe")
    moe_relu_l1_reg_coeff_controller: str = _f(
        ControllerOptions.kind, "lambda update rule: paper (alpha^sign(target - S)); ema, "
        "deadband or pi are steadier in Stage III on small batches (docs/training.md)", "moe",
        choices=list(CONTROLLERS))
    moe_relu_l1_reg_coeff_ema_beta: float = _f(ControllerOptions.ema_beta, "ema rule: "
                                               "moving-average factor of the sparsity", "moe")
    moe_relu_l1_reg_coeff_deadband_z: float = _f(ControllerOptions.deadband_z, "deadband rule: "
                                                 "hold lambda while |S - target| <= z * sampling "
                                                 "noise of S", "moe")
    moe_relu_l1_reg_coeff_pi_kp: float = _f(ControllerOptions.pi_kp, "pi rule: proportional gain "
                                            "on log lambda", "moe")
    moe_relu_l1_reg_coeff_pi_ki: float = _f(ControllerOptions.pi_ki, "pi rule: integral gain on "
                                            "log lambda", "moe")
    moe_relu_target_sparsity: Optional[float] = _f(None, "target sparsity (default 1 - k/E)",
                                                   "moe")
    moe_relu_no_load_balancing: bool = _f(False, "plain L1 (paper Eq. 9) instead of the "
                                          "load-balanced L1", "moe")
    moe_relu_warmup_max_experts: Optional[int] = _f(None, "Stage I memory bound: dispatch at "
                                                    "most this many experts per token until the "
                                                    "target is first reached", "moe")
    moe_relu_elastic_budgets: list = _f([], "elastic training: budgets, fractions in (0, 1) of "
                                        "the undialled experts per token (e.g. 0.5 0.25), that "
                                        "a share of steps trains with the compute dial's cut "
                                        "(docs/compute-dial.md); empty = the paper", "moe",
                                        nargs="+", type=float)
    moe_relu_elastic_prob: float = _f(0.5, "elastic training: share of steps (mode step) or of "
                                      "MoE layers per step (mode layer) trained dialled", "moe")
    moe_relu_elastic_mode: str = _f("step", "elastic training: step (every MoE layer of a drawn "
                                    "step keeps the same fraction) or layer (each layer draws "
                                    "its own)", "moe", choices=["step", "layer"])
    moe_relu_elastic_full_pass: bool = _f(False, "elastic training: a drawn step trains the full "
                                          "model too (sandwich rule): the plain step's gradient "
                                          "(LM + L1) plus the LM gradient of the dialled pass "
                                          "on the same micro-batches; off = a drawn step trains "
                                          "only the dialled model", "moe")

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


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """Data-parallel ranks: the world divided by the model-parallel sizes TP * PP * CP."""
    return world_size // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
                          * cfg.context_parallel_size)


def num_micro_batches(cfg: TrainConfig, world_size: int) -> int:
    return cfg.global_batch_size // (cfg.micro_batch_size * data_parallel_size(cfg, world_size))


# ------------------------------------------------------------------------------------------------
# TrainConfig -> megatron-core TransformerConfig
# ------------------------------------------------------------------------------------------------
def transformer_config(cfg: TrainConfig, use_cpu_initialization: bool):
    """The ReMoETransformerConfig of this run (LLaMA defaults + router preset from model.py)."""
    from megatron.remoe.model import build_transformer_config  # noqa: PLC0415 -- model loads the layer specs; flag parsing does not need them

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
    if cfg.virtual_pipeline_model_parallel_size:
        # The interleaved schedule sends an activation and a gradient to the same peer when PP = 2
        # (next = prev rank). megatron-core's default, batched p2p, posts them in an order that
        # pairs them swapped: training is silently wrong (Megatron-LM issue #750). Unbatched p2p
        # separates the two directions. Each exchange is waited for: Megatron-LM's overlap_p2p_comm
        # gave run-to-run different results on gloo (the schedule deallocates an output while its
        # asynchronous send is pending, megatron-core 0.16 schedules.py:1522). Checked by
        # tests/training/test_parity.py (pp2_vp2 against 1 process, and its exact resume)
        fields.update(overlap_p2p_comm=False, batch_p2p_comm=False)
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
