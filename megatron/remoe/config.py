"""ReMoE configuration: a megatron-core TransformerConfig with the ReLU-routing fields.

Field names follow the reference implementation's flags (`--moe-relu-routing`,
`--moe-relu-l1-reg-coeff-init`, `--moe-relu-l1-reg-coeff-multiplier`, `--moe-granularity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.remoe.compat import (
    cuda_graph_settings,
    fixed_k_features,
    mcore_version_string,
    variable_k_dispatch_settings,
)
from megatron.remoe.dial import ComputeDial, DialError, dial_from_dict, make_dial
from megatron.remoe.errors import ConfigError
from megatron.remoe.lambda_rules import (
    PAPER_L1_COEFF_INIT,
    PAPER_L1_COEFF_MULTIPLIER,
    ControllerOptions,
)

ROUTERS = ("relu", "topk", "topk-sigmoid-bias", "dense")


@dataclass
class ReMoETransformerConfig(TransformerConfig):
    """TransformerConfig plus ReLU routing (ReMoE, arXiv 2412.14711)."""

    moe_relu_routing: bool = False
    """Route with R(x) = ReLU(x W) instead of TopK+softmax."""

    moe_relu_l1_reg_coeff_init: float = PAPER_L1_COEFF_INIT
    """lambda_0, the initial coefficient of the L1 regulariser."""

    moe_relu_l1_reg_coeff_multiplier: float = PAPER_L1_COEFF_MULTIPLIER
    """alpha: lambda is multiplied by alpha while sparsity is below target, divided otherwise
    (equality included)."""

    # the rule and its options: defaults and meaning from lambda_rules.ControllerOptions
    moe_relu_l1_reg_coeff_controller: str = ControllerOptions.kind
    """lambda update rule: paper (alpha^sign(target - S); S == target divides), or ema / deadband /
    pi, steadier options for small batches that follow the paper's rule until the target is first
    reached (megatron/remoe/lambda_rules.py)."""

    moe_relu_l1_reg_coeff_ema_beta: float = ControllerOptions.ema_beta
    """ema: the moving average of the sparsity is m <- beta * m + (1 - beta) * S."""

    moe_relu_l1_reg_coeff_deadband_z: float = ControllerOptions.deadband_z
    """deadband: lambda is held while |S - target| <= z * sqrt(target (1 - target) / tokens)."""

    moe_relu_l1_reg_coeff_pi_kp: float = ControllerOptions.pi_kp
    """pi: proportional gain on log lambda per unit of sparsity error."""

    moe_relu_l1_reg_coeff_pi_ki: float = ControllerOptions.pi_ki
    """pi: integral gain (log lambda per step per unit of sparsity error)."""

    moe_relu_target_sparsity: Optional[float] = None
    """Target fraction of zero router outputs; default 1 - topk / num_moe_experts."""

    moe_relu_load_balancing: bool = True
    """Load-balanced L1 (paper Eqs. 10-11). False gives plain L1 (Eq. 9), the paper's ablation."""

    moe_relu_warmup_max_experts: Optional[int] = None
    """Stage I memory bound: until the global sparsity first reaches the target, dispatch each token
    to at most this many experts (its largest gates). The regulariser and the sparsity statistics
    still see every positive gate, so the controller is unaffected. None = no bound (the paper)."""

    moe_cpu_experts: str = "grouped"
    """Expert module on CPU: grouped (megatron/remoe/cpu/experts.py: SequentialMLP's parameters,
    one GEMM pass over all experts) or sequential (megatron-core's SequentialMLP). GPUs ignore it."""

    moe_granularity: int = 1
    """Recorded for reference: num_moe_experts, topk and the expert width already include it."""

    moe_relu_dial: Optional[object] = None
    """Inference-time compute dial (`megatron.remoe.dial.ComputeDial` or its dict form): per-MoE-
    layer gate thresholds and an optional per-token cap. None = the trained model. Inference only:
    a router in training mode refuses it."""

    moe_relu_elastic_budget: Optional[object] = None
    """Elastic training (megatron/remoe/elastic.py): the cut of the current training step, set by
    the trainer before each step: a fraction in (0, 1) of each MoE layer's positive gates to keep,
    or {layer_number: fraction}. None = undialled (the paper). Evaluation forwards ignore it."""

    moe_relu_elastic_lm_only: bool = False
    """Elastic training with a full pass (elastic.py): the current training forward is the dialled
    pass of a step whose full pass already added the L1 term and the controller's statistics, so
    the routers add neither."""

    def __post_init__(self):
        if self.moe_relu_routing:
            self._prepare_relu_routing()
        super().__post_init__()
        if self.moe_relu_routing:
            validate_relu_routing(self)
        if self.moe_relu_dial is not None:
            check_config_dial(self)

    def finalize(self) -> None:
        """Re-check the config after fields were changed since construction.

        Megatron-Bridge, its recipes and command-line overrides set fields after construction and
        then call `config.finalize()` (megatron-core 0.19's GPTModelConfig.finalize calls it when
        the config has one). megatron-core's TransformerConfig has no finalize (0.16-0.19) and its
        __post_init__ can run again (same fields after a second run), so this re-runs the whole
        construction: the ReLU fix-ups, megatron-core's checks, the ReLU validation. A capacity
        factor this config set itself is recomputed from the current fields (E/topk may have
        changed); a value the user set is kept.
        """
        for key, value in getattr(self, "_relu_dispatch_overrides", {}).items():
            if getattr(self, key) == value:
                setattr(self, key, type(self).__dataclass_fields__[key].default)
        self._relu_dispatch_overrides = {}
        self.__post_init__()

    def _prepare_relu_routing(self) -> None:
        # The TopK-only knobs are irrelevant for ReLU routing; set them so megatron-core's own
        # validation (which assumes a TopK router) accepts the config.
        if self.moe_router_load_balancing_type in (None, "aux_loss") and not self.moe_aux_loss_coeff:
            self.moe_router_load_balancing_type = "none"
        if self.moe_router_topk == 1:
            self.moe_router_pre_softmax = True
        # before megatron-core's own checks, which reject some of these with less useful messages
        refused = fixed_k_features(self)
        if refused:
            name, why, fix = refused[0]
            raise ConfigError(f"{name} {why}, a fixed number per token, which ReLU routing "
                              f"(0..E experts per token) does not have; {fix}")
        refuse_cuda_graphs(self)  # megatron-core's own CUDA-graph checks give less useful messages
        if self.num_moe_experts and self.moe_router_topk:
            overrides = variable_k_dispatch_settings(
                self.num_moe_experts, self.moe_router_topk, self.moe_token_dispatcher_type,
                self.moe_permute_fusion, self.moe_expert_capacity_factor)
            for key, value in overrides.items():
                setattr(self, key, value)
            # remembered so that finalize() recomputes what it set, not what the user set
            self._relu_dispatch_overrides = overrides

    @property
    def target_sparsity(self) -> float:
        if self.moe_relu_target_sparsity is not None:
            return float(self.moe_relu_target_sparsity)
        return 1.0 - self.moe_router_topk / self.num_moe_experts


def validate_relu_routing(cfg: ReMoETransformerConfig) -> None:
    """Reject settings that are wrong for variable-k ReLU routing, with the fix in the message."""
    E, k = cfg.num_moe_experts, cfg.moe_router_topk
    if not E:
        raise ConfigError("moe_relu_routing needs num_moe_experts > 0; set --num-experts")
    check_topk_range(k, E, names=("moe_router_topk", "num_moe_experts"),
                     tail=": it sets the target sparsity 1 - k/E; lower --moe-router-topk")
    if cfg.moe_apply_probs_on_input:
        raise ConfigError(
            "moe_apply_probs_on_input requires top-1 routing; ReLU routing weights expert outputs: "
            "drop --moe-apply-probs-on-input")
    if cfg.moe_pad_expert_input_to_capacity:
        raise ConfigError(
            "moe_pad_expert_input_to_capacity drops tokens above capacity, which changes ReLU "
            "routing; drop --moe-pad-expert-input-to-capacity")
    cap = cfg.moe_expert_capacity_factor
    if cap is not None and cap < E / k:
        raise ConfigError(
            f"moe_expert_capacity_factor={cap} could drop tokens (ReLU routing may send a token to "
            f"all {E} experts); unset it or use at least E/topk = {E / k:g}")
    lbt = cfg.moe_router_load_balancing_type
    if lbt not in ("none", ["none"]) or cfg.moe_aux_loss_coeff not in (0, 0.0, None, [0.0]):
        raise ConfigError(
            f"moe_router_load_balancing_type={lbt!r} / moe_aux_loss_coeff={cfg.moe_aux_loss_coeff} "
            "are TopK load balancing; ReLU routing balances with its L1 regulariser: remove them")
    if cfg.moe_router_enable_expert_bias:
        raise ConfigError("moe_router_enable_expert_bias is for TopK routing; remove it with "
                          "--moe-relu-routing")
    if cfg.moe_router_num_groups or cfg.moe_router_group_topk:
        raise ConfigError("group-limited routing (moe_router_num_groups / moe_router_group_topk) "
                          "is TopK-only; remove it with --moe-relu-routing")
    if cfg.moe_router_fusion:
        raise ConfigError("moe_router_fusion fuses TopK kernels; remove it with --moe-relu-routing")
    if cfg.moe_z_loss_coeff:
        # Nothing wrong mathematically, but the router below does not implement it: say so.
        raise ConfigError("moe_z_loss_coeff is not applied by the ReLU router; remove it")
    if cfg.moe_input_jitter_eps:
        raise ConfigError("moe_input_jitter_eps is not applied by the ReLU router; remove it")
    refuse_cuda_graphs(cfg)
    bound = cfg.moe_relu_warmup_max_experts
    if bound is not None and not 1 <= bound <= E:
        raise ConfigError(f"moe_relu_warmup_max_experts={bound} must be in [1, num_moe_experts={E}]"
                          " (or unset)")
    if not 0.0 <= cfg.target_sparsity < 1.0:
        raise ConfigError(f"moe_relu_target_sparsity={cfg.target_sparsity} must be in [0, 1)")
    check_l1_coeff_init(cfg.moe_relu_l1_reg_coeff_init)
    check_l1_multiplier(cfg.moe_relu_l1_reg_coeff_multiplier)
    controller_options(cfg).validate()


def refuse_cuda_graphs(cfg) -> None:
    """CUDA graphs replay the captured router: the controller gives lambda a new tensor each step
    (the graph keeps reading the freed capture-time one) and the router's Python branches
    (training, the Stage I bound) stay as they were at capture."""
    found = cuda_graph_settings(cfg)
    if found:
        raise ConfigError(f"{found[0]} (CUDA graphs) is not supported with ReLU routing: a captured"
                          " router keeps its capture-time lambda and Stage I bound; remove it "
                          "(cuda_graph_impl='none')")


def check_variable_k_dispatch(cfg) -> None:
    """Called when a ReLU router is built: the variable-k dispatch settings the config applied at
    construction (compat.variable_k_dispatch_settings) still hold. A config changed afterwards
    (e.g. `moe_permute_fusion=True` set by a recipe) would otherwise size the permutation as
    tokens * topk: an out-of-bounds write in TE's fused permute in Stage I."""
    E, k = cfg.num_moe_experts, cfg.moe_router_topk
    missing = variable_k_dispatch_settings(
        E, k, cfg.moe_token_dispatcher_type, cfg.moe_permute_fusion,
        cfg.moe_expert_capacity_factor)
    if missing:
        why = ("moe_permute_fusion=True" if cfg.moe_permute_fusion
               else f"megatron-core {mcore_version_string()}")
        raise ConfigError(
            f"moe_expert_capacity_factor=None with moe_token_dispatcher_type='alltoall' and {why} "
            "sizes the permutation as tokens x topk, which ReLU routing (0..E experts per token) "
            "overruns; the config changed after construction: call config.finalize() before "
            f"building the model, or set moe_expert_capacity_factor={E / k:g}")


# The ReMoE range rules, owned here and worded in the caller's vocabulary: the trainer names flags
# (`moe_router_topk=9 must be in [1, num_experts=8]`), the ablation tool its axes (`k=9 ... E=8`).
def check_topk_range(k: Optional[int], num_experts: int,
                     names: tuple = ("moe_router_topk", "num_experts"),
                     tail: str = "; lower --moe-router-topk or raise --num-experts") -> None:
    """k active experts of E: 1 <= k <= E (k/E sets ReLU routing's target sparsity)."""
    if k is None or not 1 <= k <= num_experts:
        raise ConfigError(f"{names[0]}={k} must be in [1, {names[1]}={num_experts}]{tail}")


def check_l1_coeff_init(value: float, what: Optional[str] = None,
                        tail: str = "; the paper uses 1e-8") -> None:
    """lambda_0 > 0: the controller multiplies lambda, so it can never leave 0."""
    if not value > 0:
        what = what or f"moe_relu_l1_reg_coeff_init={value}"
        raise ConfigError(f"{what} must be > 0 (the update is multiplicative){tail}")


def check_l1_multiplier(value: float, what: Optional[str] = None,
                        tail: str = "; the paper uses 1.2") -> None:
    """alpha > 1: lambda grows by alpha below the target sparsity and shrinks above it."""
    if not value > 1.0:
        what = what or f"moe_relu_l1_reg_coeff_multiplier={value}"
        raise ConfigError(f"{what} must be > 1{tail}")


def check_granularity(granularity: int, width: Optional[int], name: str = "moe_granularity",
                      range_tail: str = "", divides: str = "must divide",
                      divide_tail: str = "; pick a divisor or change --ffn-hidden-size") -> None:
    """G >= 1 and G divides the expert width (E*G experts of width ffn/G); an unknown width (None
    or 0) is not checked. The ablation tool words it `G=3 does not divide the expert width ...`."""
    if granularity < 1:
        raise ConfigError(f"{name}={granularity} must be >= 1{range_tail}")
    if width and width % granularity:
        raise ConfigError(f"{name}={granularity} {divides} the expert width {width}{divide_tail}")


def controller_options(cfg: ReMoETransformerConfig) -> ControllerOptions:
    """The lambda update rule of this config (megatron/remoe/lambda_rules.py)."""
    return ControllerOptions(
        kind=cfg.moe_relu_l1_reg_coeff_controller, ema_beta=cfg.moe_relu_l1_reg_coeff_ema_beta,
        deadband_z=cfg.moe_relu_l1_reg_coeff_deadband_z, pi_kp=cfg.moe_relu_l1_reg_coeff_pi_kp,
        pi_ki=cfg.moe_relu_l1_reg_coeff_pi_ki)


def apply_granularity(num_experts: int, topk: int, expert_ffn_hidden_size: int,
                      granularity: int) -> tuple[int, int, int]:
    """Fine-grained experts: E*G experts of width ffn/G, k*G active; target sparsity 1-k/E unchanged.

    Returns (num_moe_experts, moe_router_topk, moe_ffn_hidden_size).
    """
    check_granularity(granularity, expert_ffn_hidden_size)
    return num_experts * granularity, topk * granularity, expert_ffn_hidden_size // granularity


def router_overrides(router: str, aux_loss_coeff: float = 1e-2) -> dict:
    """TransformerConfig fields for each router choice (the paper's baseline presets)."""
    if router == "relu":
        return dict(moe_relu_routing=True, moe_router_load_balancing_type="none",
                    moe_aux_loss_coeff=0.0)
    if router == "topk":
        # ReMoE's TopK baseline: pre-softmax top-k (with post-softmax top-1 the gate is constant 1
        # and the router learns only from the aux loss) and Switch aux loss 1e-2.
        return dict(moe_relu_routing=False, moe_router_load_balancing_type="aux_loss",
                    moe_aux_loss_coeff=aux_loss_coeff, moe_router_pre_softmax=True)
    if router == "topk-sigmoid-bias":
        # Aux-loss-free balancing (DeepSeek-V3 style): sigmoid scores plus a per-expert bias.
        return dict(moe_relu_routing=False, moe_router_load_balancing_type="none",
                    moe_aux_loss_coeff=0.0, moe_router_score_function="sigmoid",
                    moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3)
    if router == "dense":
        return dict(moe_relu_routing=False, num_moe_experts=None)
    raise ConfigError(f"router={router!r} is not one of {', '.join(ROUTERS)}")


# ------------------------------------------------------------------------------------------------
# What a config says about the model's layers (the one owner of "which layers are MoE")
# ------------------------------------------------------------------------------------------------
def is_relu_routed(config) -> bool:
    """Whether a config (TransformerConfig, TrainConfig or anything with the field) routes with ReLU."""
    return bool(getattr(config, "moe_relu_routing", False))


def default_ffn_hidden_size(hidden_size: int) -> int:
    """The FFN width when `ffn_hidden_size` is not given: 4 x hidden, as in megatron-core."""
    return 4 * hidden_size


def moe_layer_pattern_of(num_layers: int, num_moe_experts, moe_layer_freq) -> list:
    """0/1 per layer, 1 where the layer has a routed MoE MLP. megatron-core's `moe_layer_freq`: an int
    N puts MoE in layers 0, N, 2N, ...; a list is the 0/1 pattern itself."""
    if not num_moe_experts:
        return [0] * num_layers
    if isinstance(moe_layer_freq, (list, tuple)):
        pattern = [1 if int(x) else 0 for x in moe_layer_freq]
        if len(pattern) != num_layers:
            raise ValueError(f"moe_layer_freq has {len(pattern)} entries for {num_layers} layers; "
                             "give one 0/1 per layer")
        return pattern
    freq = int(moe_layer_freq or 1)
    return [1 if i % freq == 0 else 0 for i in range(num_layers)]


def moe_layer_pattern(config) -> list:
    """`moe_layer_pattern_of` for a config object."""
    return moe_layer_pattern_of(config.num_layers, config.num_moe_experts, config.moe_layer_freq)


def num_moe_layers(config) -> int:
    return sum(moe_layer_pattern(config))


def moe_layer_numbers(config) -> tuple:
    """Global 1-based layer numbers of a TransformerConfig's MoE layers."""
    return tuple(i + 1 for i, moe in enumerate(moe_layer_pattern(config)) if moe)


def check_config_dial(config) -> None:
    """ReMoETransformerConfig validation of `moe_relu_dial` (a ComputeDial or its dict form):
    bound to this config's MoE layers (megatron/remoe/dial.py)."""
    dial = config.moe_relu_dial
    if dial is None:
        return
    if not config.moe_relu_routing:
        raise DialError("moe_relu_dial applies to ReLU routing only; for TopK change "
                        "moe_router_topk instead")
    if isinstance(dial, dict):
        dial = dial_from_dict(dial, moe_layer_numbers(config), config.num_moe_experts)
    elif not isinstance(dial, ComputeDial):
        raise DialError(f"moe_relu_dial must be a ComputeDial or its dict, not "
                        f"{type(dial).__name__}")
    else:
        dial = make_dial(dial.thresholds, dial.layer_numbers or moe_layer_numbers(config),
                         dial.form, dial.max_experts, config.num_moe_experts)
    config.moe_relu_dial = dial
