"""Routing statistics against a routing map counted by hand (zero-expert tokens, padding, dead experts)."""

import torch

from megatron.remoe.controller import SparsityController

# 6 tokens x 4 experts. Token 3 has no expert; token 5 is padding; expert 3 is never used.
MAP = torch.tensor([
    [1, 1, 0, 0],
    [1, 0, 0, 0],
    [1, 1, 1, 0],
    [0, 0, 0, 0],
    [0, 1, 0, 0],
    [1, 1, 1, 0],  # padding: must not count anywhere
], dtype=torch.bool)
VALID = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)


def test_stats_match_hand_count():
    ctrl = SparsityController(num_layers=3, num_experts=4, target_sparsity=0.75)
    ctrl.record(2, MAP, VALID, reg_term=torch.tensor(0.5))
    ctrl.record(2, MAP[:2], None, reg_term=torch.tensor(1.5))  # a second micro-batch, no padding
    stats = ctrl.step()
    assert stats.layer_numbers == [2]  # layers that never ran are not reported
    # expert loads: micro-batch 1 (valid rows 0-4) + micro-batch 2 (rows 0-1)
    assert stats.tokens_per_expert.tolist() == [[3 + 2, 3 + 1, 1, 0]]
    # experts per token: mb1 -> [2,1,3,0,1], mb2 -> [2,1]
    assert stats.experts_per_token_hist.tolist() == [[1, 2 + 1, 1 + 1, 1, 0]]
    assert stats.tokens.tolist() == [5 + 2]
    active, entries = 5 + 4 + 1 + 0, 7 * 4
    assert stats.sparsity == 1 - active / entries
    assert abs(float(stats.zero_expert_fraction[0]) - 1 / 7) < 1e-12
    assert abs(float(stats.mean_experts_per_token[0]) - 10 / 7) < 1e-12
    assert abs(float(stats.max_over_mean_load[0]) - 5 / 2.5) < 1e-12
    assert stats.l1_reg_loss == 1.0  # mean of the two micro-batch terms
    d = stats.as_dict()
    assert d["moe/layer_2/sparsity"] == stats.sparsity
    # a dead expert is visible as a zero load
    assert int(stats.tokens_per_expert[0, 3]) == 0
    # counts are reset after each step
    assert ctrl.step() is None


def test_lambda_moves_with_global_not_per_layer_sparsity():
    """Two layers, one dense-ish and one sparse: the update uses the pooled fraction of zeros."""
    ctrl = SparsityController(num_layers=2, num_experts=4, target_sparsity=0.5, l1_coeff_init=1.0,
                              multiplier=2.0)
    ctrl.record(1, torch.ones(4, 4, dtype=torch.bool), None, None)   # sparsity 0
    ctrl.record(2, torch.zeros(4, 4, dtype=torch.bool), None, None)  # sparsity 1
    stats = ctrl.step()
    assert stats.sparsity == 0.5 and float(ctrl.l1_coeff) == 0.5  # equality divides


def test_dead_experts_over_a_window():
    from megatron.remoe.routing_stats import RoutingWindow

    ctrl = SparsityController(num_layers=1, num_experts=4, target_sparsity=0.75)
    window = RoutingWindow()
    ctrl.record(1, MAP, VALID, None)  # expert 3 unused
    window.add(ctrl.step())
    assert window.dead_experts() == {1: [3]}
    ctrl.record(1, torch.tensor([[0, 0, 0, 1]], dtype=torch.bool), None, None)
    window.add(ctrl.step())
    assert window.dead_experts() == {1: []} and window.steps == 2
    assert window.as_dict() == {"moe/layer_1/dead_experts": 0}
    window.reset()
    assert window.dead_experts() == {}


def test_report_gives_the_step_statistics_without_updating_lambda():
    """`report()` (a step that is not applied) reduces and resets the counts like `step()`, but
    lambda, the step count and the rule's state stay; the next `step()` updates as usual."""
    ctrl = SparsityController(num_layers=1, num_experts=4, target_sparsity=0.75, l1_coeff_init=1.0,
                              multiplier=2.0)
    ctrl.record(1, MAP, VALID, reg_term=torch.tensor(0.5))
    reported = ctrl.report()
    assert float(ctrl.l1_coeff) == 1.0 and ctrl.steps == 0 and not ctrl.reached_target
    assert ctrl.report() is None  # counts were reset
    ctrl.record(1, MAP, VALID, reg_term=torch.tensor(0.5))
    stepped = ctrl.step()
    assert reported.as_dict() == stepped.as_dict()
    assert float(ctrl.l1_coeff) == 2.0 and ctrl.steps == 1  # sparsity 0.5 < 0.75: lambda * alpha


def test_saved_state_round_trips_through_its_plain_form():
    """What a checkpoint holds under CHECKPOINT_KEY, as floats (an HF export's metadata), loads back."""
    ctrl = SparsityController(num_layers=1, num_experts=4, target_sparsity=0.75, l1_coeff_init=0.25)
    plain = SparsityController.plain_state(ctrl.state_dict())
    assert plain[SparsityController.L1_COEFF_KEY] == 0.25
    assert SparsityController.saved_l1_coeff(plain) == 0.25
    assert SparsityController.saved_l1_coeff(None) is None
    other = SparsityController(num_layers=1, num_experts=4, target_sparsity=0.75)
    other.load_state_dict(plain)
    assert torch.equal(other.l1_coeff, ctrl.l1_coeff) and other.l1_coeff.dtype == torch.float32
