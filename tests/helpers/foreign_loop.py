"""A training loop written from megatron-core's own pieces only, as Megatron-LM's or Bridge's
loop would be: process groups and seeding as Megatron-LM's initialize.py, GPTModel, megatron-core
DDP, get_megatron_optimizer, OptimizerParamScheduler, get_forward_backward_func,
finalize_model_grads, dist_checkpointing with the model's and the optimizer's sharded state dicts.

From this project it uses only `remoe_layer_spec` and `attach` (megatron.remoe.integration), the
CPU bridge (megatron-core on CPU), and the run's config and mock-data batches (so that it sees the
batches `remoe train` sees). Used by tests/integration/test_foreign_loop.py:

    torchrun --nproc-per-node N -m tests.helpers.foreign_loop CKPT STOP OUT -- <remoe train flags>

runs up to step STOP (from scratch, or resumed from CKPT if it exists), saves into CKPT at SAVE_AT
and writes each rank's per-step records to OUT.rank<R>.json.
"""

import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron.remoe.cpu.backend import apply_cpu_backend
from megatron.remoe.integration import attach, remoe_layer_spec
from megatron.remoe.training.arguments import parse_config
from megatron.remoe.training.config import transformer_config
from megatron.remoe.training.data import build_datasets, load_run_tokenizer, make_loader, padded_vocab_size

SAVE_AT = 15


def _setup(cfg):
    """Megatron-LM's process-group set-up and seeding (initialize.py), on the CPU bridge."""
    apply_cpu_backend()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size)
    apply_cpu_backend()
    seed = cfg.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _build(cfg, vocab):
    """GPTModel from the ReMoE spec, megatron-core DDP, optimizer, schedule, attach."""
    config = transformer_config(cfg, use_cpu_initialization=True)
    model = GPTModel(config=config, transformer_layer_spec=remoe_layer_spec(config),
                     vocab_size=vocab, max_sequence_length=cfg.seq_length,
                     pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                     post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
                     share_embeddings_and_output_weights=False, position_embedding_type="rope",
                     rotary_base=cfg.rotary_base)
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    model = [DistributedDataParallel(
        config=config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, check_for_nan_in_grad=False))]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, params_dtype=torch.float32), model)
    # the CPU Adam kernel `remoe train` picks (same update as the loop, other float rounding)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            group["fused"] = True
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=cfg.train_iters,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters, wd_incr_style="constant")
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    controller = attach(model, optimizer)
    return model, optimizer, scheduler, controller


def _forward_step(data_iterator, model):
    """Megatron-LM's pretrain_gpt forward step: sum of masked token losses and their count."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float().view(-1)

    def loss_func(output_tensor):
        loss = torch.sum(output_tensor.float().view(-1) * mask)
        return loss, mask.sum().to(torch.int), {"lm loss": torch.stack([loss.detach(),
                                                                         mask.sum()])}

    return output, loss_func


def _mean_loss(losses):
    """Mean token loss of the global batch on a last-stage rank (None elsewhere)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.zeros(2, dtype=torch.float64)
    for item in losses:
        total += item["lm loss"].to(torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp(min=1))


def _save(ckpt, model, optimizer, scheduler, iteration):
    sd = {"model": model[0].module.sharded_state_dict()}
    sd["optimizer"] = optimizer.sharded_state_dict(sd)
    sd.update(iteration=iteration, scheduler=scheduler.state_dict())
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(sd, ckpt)


def _load(ckpt, model, optimizer, scheduler) -> int:

    common = dist_checkpointing.load_common_state_dict(ckpt)
    sd = {"model": model[0].module.sharded_state_dict()}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True)
    state = dist_checkpointing.load(sd, ckpt)
    model[0].module.load_state_dict(state["model"])
    with torch.no_grad():
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    return common["iteration"]


def foreign_loop(world, argv, ckpt, stop):
    """Steps up to `stop`: from scratch, or resumed from `ckpt` if it exists; saves there at
    SAVE_AT. Returns this rank's per-step records."""
    cfg = parse_config(argv, world_size=world, cuda=False)
    tokenizer = load_run_tokenizer(cfg)
    _setup(cfg)
    model, optimizer, scheduler, controller = _build(
        cfg, padded_vocab_size(tokenizer.vocab_size, cfg))
    start = _load(ckpt, model, optimizer, scheduler) if os.path.isdir(ckpt) else 0
    dp_rank, dp = parallel_state.get_data_parallel_rank(), \
        parallel_state.get_data_parallel_world_size()
    micro_batches = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    train = build_datasets(cfg, tokenizer)[0]
    data = iter(make_loader(train, start * cfg.global_batch_size,
                            cfg.train_iters * cfg.global_batch_size, cfg, dp_rank, dp))
    forward_backward = get_forward_backward_func()
    records = []
    for iteration in range(start + 1, stop + 1):
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=_forward_step, data_iterator=data,
                                  model=model, num_microbatches=micro_batches,
                                  seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size)
        applied, grad_norm, _ = optimizer.step()  # attach's hook moves lambda here
        if applied:
            scheduler.step(increment=1)
        stats = controller.last_stats
        records.append({"iteration": iteration, "lm_loss": _mean_loss(losses),
                        "grad_norm": float(grad_norm), "lambda": stats.l1_coeff,
                        "sparsity": stats.sparsity, "lambda_next": float(controller.l1_coeff),
                        "optimizers": len(getattr(optimizer, "chained_optimizers", [optimizer]))})
        if iteration == SAVE_AT:
            _save(ckpt, model, optimizer, scheduler, iteration)
    dist.barrier()
    return records


def main():
    ckpt, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    argv = sys.argv[sys.argv.index("--") + 1:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    records = foreign_loop(world, argv, ckpt, stop)
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as fh:
        json.dump(records, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
