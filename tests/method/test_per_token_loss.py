"""`calculate_per_token_loss=True` (Megatron-Bridge recipes set it): megatron-core then divides every
gradient by the global token count instead of averaging over micro-batches and data-parallel ranks,
and rescales its routers' aux losses to match. The ReLU router's L1 term must be rescaled the same
way: with equal-size micro-batches, every gradient (the router's L1 part included) equals the one of
the default mode. Both runs go through megatron-core's own schedule, DDP and finalize_model_grads."""

from functools import partial

import pytest
import torch

from megatron.remoe.model import build_controller, build_gpt_model, build_transformer_config
from megatron.remoe.training.distributed import ParallelConfig, destroy_distributed, init_distributed
from tests.helpers.dist_utils import run_workers

pytestmark = pytest.mark.timeout(300)

MICRO_BATCHES, MICRO_BATCH, SEQ, VOCAB = 2, 2, 16, 64


def token_loss(loss_mask, output_tensor):
    """megatron-core's three-value loss convention: sum of token losses, token count, report."""
    mask = loss_mask.float().view(-1)
    total = torch.sum(output_tensor.float().view(-1) * mask)
    return total, mask.sum().to(torch.int), {"loss": total.detach()}


def forward_step(data_iterator, model):
    ids = next(data_iterator)
    pos = torch.arange(SEQ).unsqueeze(0).expand(ids.shape[0], -1)
    output = model(ids, pos, None, labels=ids)
    return output, partial(token_loss, torch.ones_like(ids))


def grads_of(mode_per_token: bool, l1_init: float, tp: int, state=None, dp_rank: int = 0):
    """All main_grads after one forward/backward over MICRO_BATCHES micro-batches, and the weights
    used (so that every run starts from the same model)."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = build_transformer_config(
        router="relu", num_experts=4, moe_router_topk=1, num_layers=2, hidden_size=32,
        num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True,
        moe_router_dtype="fp32", moe_relu_l1_reg_coeff_init=l1_init, init_method_std=0.2,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        calculate_per_token_loss=mode_per_token)
    model = build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=SEQ,
                            controller=build_controller(cfg), use_transformer_engine=False)
    if state is not None:
        model.load_state_dict(state)
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    ddp = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(),
                                  module=model)
    cfg.finalize_model_grads_func = finalize_model_grads
    ddp.train()
    ddp.zero_grad_buffer()
    g = torch.Generator().manual_seed(100 + dp_rank)  # each data-parallel rank its own batch
    batches = iter([torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
                    for _ in range(MICRO_BATCHES)])
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[ddp],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
        forward_only=False)
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}, state


def compare_modes(tp: int, dp_rank: int = 0):
    """(per-token grads, default grads, default grads with lambda ~ 0) on this rank."""
    default, state = grads_of(False, 0.1, tp, dp_rank=dp_rank)
    per_token, _ = grads_of(True, 0.1, tp, state, dp_rank=dp_rank)
    no_l1, _ = grads_of(False, 1e-30, tp, state, dp_rank=dp_rank)
    return per_token, default, no_l1


def check(per_token, default, no_l1):
    routers = [n for n in default if n.endswith("router.weight")]
    assert len(routers) == 2
    for name in routers:  # the L1 term is a sizeable part of the router's gradient here
        assert (default[name] - no_l1[name]).norm() > 0.1 * default[name].norm(), name
    assert per_token.keys() == default.keys()
    for name, grad in default.items():
        torch.testing.assert_close(per_token[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.core
def test_per_token_loss_gives_the_default_modes_gradients(single_rank):
    check(*compare_modes(tp=1))


def _worker(rank, world_size, tp):
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=1234)
    try:
        return compare_modes(tp, dp_rank=rank // tp)
    finally:
        destroy_distributed()


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2_sp", "dp2"])
def test_per_token_loss_with_tensor_and_data_parallel(layout):
    """TP2 with sequence parallel: each rank's router sees half the tokens, so the factor needs
    TP*CP (megatron-core 0.16's TopK factor lacked it); DP2: the factor excludes DP."""
    tp = 2 if layout == "tp2_sp" else 1
    for result in run_workers(_worker, 2, tp):
        check(*result)
