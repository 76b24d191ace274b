"""Activation recomputation must not change the model: every MoE layer is counted once per
micro-batch whether or not its forward runs twice, and the Stage I bound dispatches the same experts
in megatron-core's no-grad first forward as in the recomputation with grad."""

import pytest
import torch

from megatron.remoe.model import build_controller, build_gpt_model, build_transformer_config

pytestmark = [pytest.mark.core, pytest.mark.timeout(180)]

RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}


def run(mode, state=None, **fields):
    cfg = build_transformer_config(
        router="relu", num_experts=4, moe_router_topk=1, num_layers=2, hidden_size=32,
        num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True,
        moe_router_dtype="fp32", moe_relu_l1_reg_coeff_init=0.1, **RECOMPUTE[mode], **fields)
    ctrl = build_controller(cfg)
    model = build_gpt_model(cfg, vocab_size=64, max_sequence_length=16, controller=ctrl,
                            use_transformer_engine=False)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    losses = []
    for _ in range(2):  # two micro-batches
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model.state_dict(), ctrl.step(), grads, losses


def test_recompute_counts_each_layer_once(single_rank):
    state, base, base_grads, _ = run("none")
    assert base.tokens.tolist() == [2 * 2 * 16] * 2  # 2 micro-batches x 2 sequences x 16 tokens
    for mode in ("full", "moe"):
        _, stats, grads, _ = run(mode, state)
        assert stats.sparsity == base.sparsity, mode
        assert torch.equal(stats.tokens_per_expert, base.tokens_per_expert), mode
        assert torch.equal(stats.tokens, base.tokens), mode
        assert abs(stats.l1_reg_loss - base.l1_reg_loss) < 1e-9, mode
        # and the regulariser's gradient is applied exactly once too
        for name, grad in base_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_keeps_the_stage_one_bound(single_rank):
    """The first forward under recompute runs without grad; it must dispatch the bounded expert set
    too, or the backward differentiates a different function from the one that gave the loss."""
    wide = dict(init_method_std=0.2)  # expert outputs large enough to move the loss visibly
    bound = dict(moe_relu_warmup_max_experts=1, **wide)
    state, base, base_grads, base_losses = run("none", **bound)
    _, unbounded, _, unbounded_losses = run("none", state, **wide)
    # the bound binds here: tokens with several positive gates lose all but one, the loss moves
    assert unbounded.sparsity < 1 - 1 / 4
    assert (torch.stack(unbounded_losses) - torch.stack(base_losses)).abs().min() > 1e-2
    for mode in ("full", "moe"):
        _, stats, grads, losses = run(mode, state, **bound)
        torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), rtol=1e-6,
                                   atol=0, msg=mode)
        assert stats.sparsity == base.sparsity, mode
        assert torch.equal(stats.tokens_per_expert, base.tokens_per_expert), mode
        assert grads.keys() == base_grads.keys(), mode
        for name, grad in base_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6,
                                       msg=f"{mode}: {name}")
