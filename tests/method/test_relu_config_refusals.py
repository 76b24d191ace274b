"""Modes that would silently train a wrong ReLU-routed model are refused in one line by the config,
whoever builds it (our trainer, a library user, Megatron-Bridge): CUDA graphs over the router, a
variable-k dispatch setting lost after construction. `finalize()` re-checks a config changed after
construction and re-applies the ReLU fix-ups."""

import dataclasses

import pytest

from megatron.remoe.compat import mcore_at_least, variable_k_dispatch_settings
from megatron.remoe.config import ReMoETransformerConfig, validate_relu_routing
from megatron.remoe.errors import ConfigError
from megatron.remoe.model import build_transformer_config
from megatron.remoe.router import ReLURouter

pytestmark = pytest.mark.core

E, K = 4, 1


def relu_config(router="relu", **fields) -> ReMoETransformerConfig:
    return build_transformer_config(
        router=router, num_experts=E, moe_router_topk=K, num_layers=2, hidden_size=32,
        num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True, **fields)


def refused(match: str):
    """pytest.raises for a one-line ConfigError whose message contains `match`."""
    return pytest.raises(ConfigError, match=r"^[^\n]*" + match + r"[^\n]*$")


CUDA_GRAPHS = {
    "impl_local": (dict(cuda_graph_impl="local"), "cuda_graph_impl='local'"),
    "impl_te": (dict(cuda_graph_impl="transformer_engine"), "cuda_graph_impl='transformer_engine'"),
    "impl_full_iteration": (dict(cuda_graph_impl="full_iteration"),
                            "cuda_graph_impl='full_iteration'"),
    "enable_cuda_graph": (dict(enable_cuda_graph=True), "enable_cuda_graph=True"),
    "external_cuda_graph": (dict(external_cuda_graph=True), "external_cuda_graph=True"),
    # megatron-core's own check would fire first here (moe_preprocess with a capacity factor)
    "router_scope": (dict(cuda_graph_impl="local", moe_token_dispatcher_type="alltoall",
                          **{("cuda_graph_modules" if mcore_at_least(0, 19) else
                              "cuda_graph_scope"): ["moe_router", "moe_preprocess"]}),
                     "cuda_graph_impl='local'"),
}


@pytest.mark.parametrize("case", list(CUDA_GRAPHS))
def test_cuda_graphs_are_refused(case):
    fields, name = CUDA_GRAPHS[case]
    with refused(name + r" \(CUDA graphs\) is not supported with ReLU routing.*"
                        r"cuda_graph_impl='none'"):
        relu_config(**fields)


def test_cuda_graphs_set_after_construction_are_refused_by_validation_and_finalize():
    cfg = relu_config()
    cfg.cuda_graph_impl = "local"
    with refused(r"cuda_graph_impl='local' \(CUDA graphs\)"):
        validate_relu_routing(cfg)
    with refused(r"cuda_graph_impl='local' \(CUDA graphs\)"):
        cfg.finalize()


def test_cuda_graphs_stay_allowed_for_topk():
    assert relu_config("topk", cuda_graph_impl="local").cuda_graph_impl == "local"


def test_router_refuses_a_dispatch_setting_lost_after_construction(single_rank):
    """TE's fused permute with no capacity factor sizes its output as tokens x topk and writes
    every routed pair unchecked: the router is not built on such a config."""
    cfg = relu_config(moe_token_dispatcher_type="alltoall")
    ReLURouter(cfg)  # as constructed: fine
    cfg.moe_permute_fusion = True  # e.g. set by a recipe after construction
    cfg.moe_expert_capacity_factor = None
    with refused(r"moe_expert_capacity_factor=None with moe_token_dispatcher_type='alltoall' and "
                 r"moe_permute_fusion=True .*config.finalize\(\).*moe_expert_capacity_factor=4"):
        ReLURouter(cfg)
    cfg.moe_permute_fusion = False  # megatron-core >= 0.17 cuts the unfused permutation too
    if mcore_at_least(0, 17):
        with refused(r"moe_expert_capacity_factor=None .* and megatron-core 0\.\d+"):
            ReLURouter(cfg)
    else:
        ReLURouter(cfg)


def test_finalize_reapplies_the_dispatch_settings(single_rank):
    cfg = relu_config(moe_token_dispatcher_type="allgather")
    assert cfg.moe_expert_capacity_factor is None
    cfg.moe_token_dispatcher_type = "alltoall"
    cfg.finalize()
    expected = variable_k_dispatch_settings(E, K, "alltoall", False)
    assert cfg.moe_expert_capacity_factor == expected.get("moe_expert_capacity_factor")
    ReLURouter(cfg)
    # a capacity factor the config set itself follows E/topk; one the user set is kept
    cfg.num_moe_experts = 2 * E
    cfg.finalize()
    if expected:
        assert cfg.moe_expert_capacity_factor == 2 * E / K
    ReLURouter(cfg)
    user = relu_config(moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=16.0)
    user.num_moe_experts = 2 * E
    user.finalize()
    assert user.moe_expert_capacity_factor == 16.0


def test_finalize_of_an_unchanged_config_changes_nothing():
    cfg = relu_config(moe_token_dispatcher_type="alltoall")
    before = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    cfg.finalize()
    assert {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == before


def test_finalize_validates_relu_fields_set_after_construction():
    cfg = relu_config()
    cfg.moe_relu_warmup_max_experts = E + 1
    with refused(f"moe_relu_warmup_max_experts={E + 1} must be in"):
        cfg.finalize()
    # a TopK config switched to ReLU routing: TopK balancing is refused ...
    topk = relu_config("topk")
    topk.moe_relu_routing = True
    with refused("moe_router_load_balancing_type='aux_loss' / moe_aux_loss_coeff=0.01"):
        topk.finalize()
    # ... and without it the ReLU fix-ups are applied (no TopK balancing type left behind)
    topk.moe_aux_loss_coeff = 0.0
    topk.finalize()
    assert topk.moe_router_load_balancing_type == "none"
