"""The router's training path shares one per-expert count between the regulariser and the
statistics and relies on probs/routing_map being masked already: check it against the general
(re-masking) path, with padding tokens."""

import pytest
import torch

from megatron.remoe.model import build_controller, build_transformer_config
from megatron.remoe.regularizer import SparsityController, l1_reg_loss
from tests.helpers.moe_reference import E, H, K, build_moe_layer, canonical_weights, load_canonical

pytestmark = [pytest.mark.core, pytest.mark.timeout(120)]


def test_router_training_path_matches_general_path_with_padding(single_rank):
    cfg = build_transformer_config(
        router="relu", num_experts=E, moe_router_topk=K, num_layers=1, hidden_size=H,
        num_attention_heads=2, ffn_hidden_size=24, use_cpu_initialization=True,
        moe_router_dtype="fp32", params_dtype=torch.float32, moe_relu_l1_reg_coeff_init=0.1)
    ctrl = build_controller(cfg)
    layer = build_moe_layer(cfg, ctrl)
    w = canonical_weights()
    load_canonical(layer, w)
    layer.train()
    x = torch.randn(6, 3, H, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(6, 3, dtype=torch.bool)
    padding[0, 1] = padding[4, 0] = padding[5, 2] = True
    with torch.enable_grad():
        probs, routing_map = layer.router(x, padding_mask=padding)
    stats = ctrl.step()

    # the general path: unmasked ReLU gates, masks applied inside l1_reg_loss / record
    valid = ~padding.reshape(-1)
    gates = torch.relu(x.reshape(-1, H) @ w["router"].T)
    expected_reg = l1_reg_loss(gates, gates > 0, K, True, valid)
    ref = SparsityController(num_layers=1, num_experts=E, target_sparsity=cfg.target_sparsity,
                             l1_coeff_init=0.1)
    ref.record(1, gates > 0, valid, expected_reg)
    expected = ref.step()

    assert torch.equal(stats.tokens_per_expert, expected.tokens_per_expert)
    assert torch.equal(stats.experts_per_token_hist, expected.experts_per_token_hist)
    assert torch.equal(stats.tokens, expected.tokens)
    assert stats.sparsity == expected.sparsity
    assert stats.l1_reg_loss == pytest.approx(expected.l1_reg_loss, rel=1e-6)
    assert not routing_map[~valid].any()
