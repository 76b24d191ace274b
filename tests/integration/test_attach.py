"""The integration API (megatron/remoe/integration.py) and lambda in the model's checkpoint state.

* `remoe_layer_spec` refuses a config without the ReMoE fields (one line), takes a wrapper with
  `.transformer` (megatron-core >= 0.19's GPTModelConfig), re-validates fields changed after
  construction, and gives every chunk / stage one controller per config and process;
* `attach`: lambda moves once per applied optimizer step, also through a ChainedOptimizer of two
  optimizers; a step megatron-core's optimizer skips (inf gradients under a grad scaler) leaves
  lambda, its step count and rule state unchanged and still reports the routing statistics;
  a skip on one rank only is a skip on every rank; a rank without routers (a dense-only
  pipeline stage) gets the state the routers loaded;
* the controller's state is every ReLURouter's `_extra_state` (a ShardedObject per MoE layer of
  the model's sharded_state_dict): a checkpoint restores it without any controller argument, and
  a checkpoint in the earlier layout (state in the common dict, no router `_extra_state`) loads
  through the same path, for the trainer and for the offline loader (HF export's lambda); a
  weights-only state dict loads strictly and leaves the controller as it is.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from megatron.remoe.errors import ConfigError
from megatron.remoe.integration import attach, controller_for, remoe_layer_spec
from megatron.remoe.model import build_transformer_config
from tests.helpers.dist_utils import run_workers

pytestmark = [pytest.mark.core, pytest.mark.timeout(170)]


def tiny_config(**kw):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                  use_cpu_initialization=True, moe_router_dtype="fp32", transformer_impl="local",
                  moe_relu_l1_reg_coeff_init=1e-3)
    fields.update(kw)
    return build_transformer_config(router="relu", num_experts=4, moe_router_topk=1, **fields)


def spec_controllers(spec) -> list:
    from megatron.remoe.compat import moe_submodules

    found = [moe_submodules(layer.submodules.mlp) for layer in spec.layer_specs]
    return [moe.router.keywords["controller"] for moe in found if moe is not None]


def test_spec_refuses_a_config_without_remoe_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    plain = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                              num_moe_experts=4, moe_router_topk=2)
    with pytest.raises(ConfigError, match="TransformerConfig has no ReMoE fields; fix: build "
                                          "the model config as .*ReMoETransformerConfig"):
        remoe_layer_spec(plain)
    with pytest.raises(ConfigError, match="no ReMoE fields"):
        remoe_layer_spec(types.SimpleNamespace(transformer=plain))


def test_spec_shares_one_controller_per_config_and_takes_a_wrapper(single_rank):
    config = tiny_config()
    chunk0 = remoe_layer_spec(config, vp_stage=None)
    wrapped = remoe_layer_spec(types.SimpleNamespace(transformer=config))  # GPTModelConfig-like
    controller = controller_for(config)
    assert spec_controllers(chunk0) == spec_controllers(wrapped) == [controller] * 2
    other = tiny_config()
    assert controller_for(other) is not controller  # another model, another controller
    assert controller_for(build_transformer_config(
        router="topk", num_experts=4, moe_router_topk=1, num_layers=2, hidden_size=32,
        num_attention_heads=4, ffn_hidden_size=64)) is None
    # a recipe changing a field after construction: the spec validates again
    config.moe_z_loss_coeff = 1e-3
    with pytest.raises(ConfigError, match="moe_z_loss_coeff is not applied by the ReLU router"):
        remoe_layer_spec(config)


def build(config, bf16=False):
    """GPTModel from the spec, megatron-core DDP and optimizer (a grad scaler with bf16)."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=remoe_layer_spec(config),
                     vocab_size=64, max_sequence_length=16, position_embedding_type="rope")
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=(
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, check_for_nan_in_grad=False)))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=bf16, params_dtype=config.params_dtype,
        loss_scale=1.0 if bf16 else None), [ddp])
    return ddp, optimizer


def forward_backward(ddp, optimizer, seed=0):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(16).expand(2, 16)
    ddp(tokens, positions, None, labels=tokens).float().sum().backward()


def moved_once(before: float, after: float) -> bool:
    return after == pytest.approx(before * 1.2) or after == pytest.approx(before / 1.2)


def test_skipped_step_leaves_lambda_and_the_next_step_moves_it_once(single_rank):
    config = tiny_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    ddp, optimizer = build(config, bf16=True)
    controller = attach(ddp, optimizer)
    assert attach([ddp], optimizer) is controller  # attaching again changes nothing
    lam = float(controller.l1_coeff)
    forward_backward(ddp, optimizer)
    next(p for p in ddp.parameters()).main_grad.fill_(float("inf"))
    applied, _, _ = optimizer.step()
    assert applied is False  # megatron-core's grad scaler found the inf and skipped the update
    assert float(controller.l1_coeff) == lam and controller.steps == 0
    assert not controller.reached_target
    assert controller.last_stats is not None and controller.last_stats.l1_coeff == lam
    forward_backward(ddp, optimizer, seed=1)
    applied, _, _ = optimizer.step()
    assert applied and controller.steps == 1 and moved_once(lam, float(controller.l1_coeff))


def test_chained_optimizer_of_two_moves_lambda_once(single_rank):
    from megatron.core.optimizer import ChainedOptimizer

    ddp, first = build(tiny_config())
    dense, second = build(build_transformer_config(
        router="dense", num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        use_cpu_initialization=True, transformer_impl="local"))
    chained = ChainedOptimizer(first.chained_optimizers + second.chained_optimizers)
    controller = attach(ddp, chained)
    for step in range(1, 4):
        lam = float(controller.l1_coeff)
        forward_backward(ddp, chained, seed=step)
        forward_backward(dense, chained, seed=step)
        applied, _, _ = chained.step()
        assert applied and controller.steps == step
        assert moved_once(lam, float(controller.l1_coeff))


def _two_ranks(rank, world):
    from megatron.remoe.controller import SparsityController
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    controller = SparsityController(num_layers=1, num_experts=4, target_sparsity=0.75,
                                    l1_coeff_init=1e-3)
    if rank == 1:  # the MoE stage: its router loaded a checkpoint; rank 0 has no router
        controller.register_router()
        controller.load_state_dict({"l1_coeff": 0.5, "steps": 9, "reached_target": True})
    out = []
    for applied in (rank == 0, True):  # step 1 is skipped by rank 1's optimizer only
        controller.record(1, torch.ones(8, 4, dtype=torch.bool), None, None)
        controller.optimizer_stepped(applied=applied)
        out.append((float(controller.l1_coeff), controller.steps, controller.reached_target))
    return out


@pytest.mark.multiprocess
def test_ranks_without_routers_get_the_loaded_state_and_skip_together():
    """The first hook call gives a rank without routers (a dense-only pipeline stage) the state
    its MoE stage loaded; a step skipped by one rank's optimizer is skipped on both."""
    per_rank = run_workers(_two_ranks, 2, timeout=120)
    assert per_rank[0] == per_rank[1]
    assert per_rank[0][0] == (0.5, 9, True)
    # sparsity 0 < 0.75: lambda * 1.2 in fp32
    assert per_rank[0][1] == (float(torch.tensor(0.5, dtype=torch.float32) * 1.2), 10, True)


# ---- lambda in the model's checkpoint state -----------------------------------------------------

ARGS = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--num-experts", "4",
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "10"]


def trainer_parts(cfg):
    """The trainer's model, optimizer and schedule, built through controller_for and attach."""
    from megatron.remoe.training.config import transformer_config
    from megatron.remoe.training.state import build_model, build_optimizer

    tcfg = transformer_config(cfg, use_cpu_initialization=True)
    controller = controller_for(tcfg)
    model = build_model(cfg, tcfg, 128, controller, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(cfg, model)
    attach(model, optimizer)
    return model, optimizer, scheduler, controller


def no_optimizer_state(cfg):
    """Adam has no state before its first step, so these checkpoints hold none to load."""
    return dataclasses.replace(cfg, no_load_optim=True)


def advanced_state(controller) -> dict:
    """A controller state no fresh controller has (lambda, steps, target reached)."""
    controller.l1_coeff = torch.tensor(0.0123, dtype=torch.float32)
    controller.steps, controller.reached_target = 7, True
    return controller.state_dict()


def assert_same_state(got: dict, want: dict):
    assert torch.equal(torch.as_tensor(got["l1_coeff"]).float(), want["l1_coeff"])
    assert (got["steps"], got["reached_target"], got["rule"]) == \
        (want["steps"], want["reached_target"], want["rule"])


def test_the_routers_carry_lambda_through_a_checkpoint(single_rank, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron.remoe.hf.to_hf import load_megatron_checkpoint
    from megatron.remoe.training.arguments import parse_config
    from megatron.remoe.training.checkpointing import load_checkpoint, load_common_state, save_checkpoint

    cfg = parse_config(ARGS, world_size=1, cuda=False)
    model, optimizer, scheduler, controller = trainer_parts(cfg)
    saved = advanced_state(controller)
    sharded = model[0].module.sharded_state_dict()
    objects = {k: v for k, v in sharded.items() if k.endswith("router._extra_state")}
    assert len(objects) == 2 and all(isinstance(v, ShardedObject) for v in objects.values())
    assert_same_state(next(iter(objects.values())).data, saved)
    path = save_checkpoint(str(tmp_path), 7, model, optimizer, scheduler, 0, cfg, "")
    assert "controller" not in load_common_state(path)  # only in the model's state
    fresh = trainer_parts(cfg)
    assert float(fresh[3].l1_coeff) != float(saved["l1_coeff"])
    load_checkpoint(path, *fresh, no_optimizer_state(cfg))
    assert_same_state(fresh[3].state_dict(), saved)
    _, _, _, info = load_megatron_checkpoint(str(tmp_path))
    assert info["l1_reg_coeff"] == float(saved["l1_coeff"])
    # a weights-only state dict (no `_extra_state`) loads strictly and leaves the controller
    bare = fresh[0][0].module
    bare.load_state_dict({k: v for k, v in bare.state_dict().items() if torch.is_tensor(v)})
    assert_same_state(fresh[3].state_dict(), saved)


def test_a_checkpoint_of_the_earlier_layout_still_loads(single_rank, tmp_path, monkeypatch):
    """Written as before lambda moved into the model: no router `_extra_state`, the state in the
    common dict under CHECKPOINT_KEY. The trainer's load and the offline loader (HF export) read
    it through the same path as a current checkpoint."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron.remoe.controller import SparsityController
    from megatron.remoe.hf.to_hf import load_megatron_checkpoint
    from megatron.remoe.router import ReLURouter
    from megatron.remoe.training.arguments import parse_config
    from megatron.remoe.training.checkpointing import load_checkpoint, save_checkpoint

    cfg = parse_config(ARGS, world_size=1, cuda=False)
    model, optimizer, scheduler, controller = trainer_parts(cfg)
    saved = advanced_state(controller)
    with monkeypatch.context() as patch:  # the routers of the earlier version: no extra state
        patch.delattr(ReLURouter, "get_extra_state")
        patch.delattr(ReLURouter, "set_extra_state")
        path = save_checkpoint(str(tmp_path), 7, model, optimizer, scheduler, 0, cfg, "",
                               extra_common={SparsityController.CHECKPOINT_KEY: saved})
    written = load_sharded_metadata(path)
    assert not [k for k in written if k.endswith("router._extra_state")]
    fresh = trainer_parts(cfg)
    load_checkpoint(path, *fresh, no_optimizer_state(cfg))
    assert_same_state(fresh[3].state_dict(), saved)
    _, _, _, info = load_megatron_checkpoint(str(tmp_path))
    assert info["l1_reg_coeff"] == float(saved["l1_coeff"])
    assert info[SparsityController.CHECKPOINT_KEY]["steps"] == 7
