"""Elastic training with a full pass (--moe-relu-elastic-full-pass, elastic.py): a drawn step's
gradient is the plain step's (LM + L1, controller statistics from the full pass) plus the LM
gradient of the dialled forward on the same micro-batches; one optimizer step.

* the trainer's step (setup + train_step, real megatron-core schedule and DDP buffers) against an
  independent computation: plain torch autograd of sum_mb [LM_full + lambda * sum_layers L1 +
  LM_dialled] / N on the same weights and micro-batches, the L1 term recomputed from the routers'
  inputs;
* lambda and the routing statistics after a drawn step equal those of a plain step;
* 2 data-parallel gloo ranks (plain DDP, --overlap-grad-reduce, distributed optimizer) and 2
  pipeline stages give the 1-process gradients of the same global batch (the reduction runs
  once, over the summed gradient);
* the trainer: a stopped and resumed run equals the uninterrupted one; without the flag the
  elastic runs are unchanged (tests/method/test_elastic.py); bad settings are one-line errors.
"""

import copy
import dataclasses
import os

import pytest
import torch

from megatron.remoe.errors import ConfigError
from tests.helpers.dist_utils import run_workers
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import uninterrupted_and_resumed
from tools.parity.tiny_gpt import MODEL, build_corpus, data_args

pytestmark = pytest.mark.timeout(240)

SEQ, GLOBAL = 32, 4
ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", str(SEQ), "--num-experts", "4",
        "--micro-batch-size", "1", "--global-batch-size", str(GLOBAL), "--mock-data",
        "--vocab-size", "128", "--train-iters", "4", "--lr", "1e-3", "--clip-grad", "0",
        "--seed", "3", "--init-method-std", "0.05",
        # lambda large enough that the L1 gradient shows beside the LM gradient
        "--moe-relu-l1-reg-coeff-init", "0.1",
        # every step is drawn, at one budget
        "--moe-relu-elastic-budgets", "0.5", "--moe-relu-elastic-prob", "1.0",
        "--moe-relu-elastic-full-pass"]
BUDGET = 0.5


def _global_batch():
    """GLOBAL samples of SEQ tokens, each its own micro-batch (some loss-masked tokens)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(GLOBAL):
        seq = torch.randint(0, 128, (1, SEQ + 1), generator=g)
        mask = torch.ones(1, SEQ)
        mask[0, : 3 * i] = 0.0  # micro-batches with different token counts
        out.append({"tokens": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).unsqueeze(0)})
    return out


def _module(run):
    return run.model[0].module


def _global_name(run, name: str) -> str:
    """A parameter's name in the 1-process model (pipeline stages number their layers from 0)."""
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    per_stage = run.cfg.num_layers // run.cfg.pipeline_model_parallel_size
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + stage * per_stage)
    return ".".join(parts)


def _grads(run) -> dict:
    return {_global_name(run, n): p.main_grad.detach().clone()
            for n, p in _module(run).named_parameters()}


def _hand_grads(run, micro_batches, lam: float, budget) -> dict:
    """Independent: autograd of sum_mb [LM_full + lambda * sum_layers L1(relu(x W^T)) +
    LM_dialled] / N, the routers' own L1 term scaled to 0 and recomputed from their inputs;
    also the token-mean LM loss of each pass."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.remoe.regularizer import l1_reg_loss
    from megatron.remoe.router import relu_routers, set_elastic_budget

    module = _module(run)
    names, params = zip(*module.named_parameters())
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    n = len(micro_batches)
    total = torch.zeros((), dtype=torch.float64)
    token_loss = {False: [0.0, 0.0], True: [0.0, 0.0]}  # [sum, count] of each pass
    for dialled in (False, True):
        set_elastic_budget(module, budget if dialled else None)
        for mb in micro_batches:
            seen = []
            hooks = [r.register_forward_pre_hook(lambda m, a: seen.append((m, a[0])))
                     for _, r in relu_routers(module)]
            try:
                out = module(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
            finally:
                for h in hooks:
                    h.remove()
            mask = mb["loss_mask"].float()
            token_loss[dialled][0] += float((out.float() * mask).sum())
            token_loss[dialled][1] += float(mask.sum())
            total = total + ((out.float() * mask).sum() / mask.sum() / n).double()
            if not dialled:
                assert len(seen) == 2
                for router, x in seen:
                    probs = torch.relu(x.reshape(-1, x.shape[-1]).float()
                                       @ router.weight.float().t())
                    reg = l1_reg_loss(probs, probs > 0, router.topk, True)
                    total = total + (lam * reg / n).double()
    set_elastic_budget(module, None)
    # without DDP's buffers the CPU grouped experts return their gradient to autograd
    buffers = [p.main_grad for p in params]
    for p in params:
        p.main_grad = None
    try:
        grads = torch.autograd.grad(total, params, allow_unused=True)
    finally:
        for p, b in zip(params, buffers):
            p.main_grad = b
    losses = {"full": token_loss[False][0] / token_loss[False][1],
              "dialled": token_loss[True][0] / token_loss[True][1]}
    return {k: (g if g is not None else torch.zeros_like(p)) for k, g, p in
            zip(names, grads, params)}, losses


def _step_worker(rank, world_size, extra, check_by_hand, start=None):
    from megatron.remoe.training.arguments import parse_config
    from megatron.remoe.training.state import setup
    from megatron.remoe.training.step import train_step

    cfg = parse_config(ARGS + list(extra), world_size=world_size, cuda=False)
    run = setup(cfg)
    batch = _global_batch()
    per_rank = len(batch) // run.dp_size
    mine = batch[run.dp_rank * per_rank:(run.dp_rank + 1) * per_rank]
    if start is not None:  # pipeline stages initialise their layers from other RNG states
        with torch.no_grad():
            for name, p in _module(run).named_parameters():
                p.copy_(start[_global_name(run, name)])
    weights = {n: p.detach().clone() for n, p in _module(run).named_parameters()}
    controller = copy.deepcopy(run.controller.state_dict())
    lam = float(run.controller.l1_coeff)
    result = train_step(run, iter(mine))
    out = {"metrics": result.metrics, "grads": _grads(run), "weights": weights,
           "controller": copy.deepcopy(run.controller.state_dict())}
    if not check_by_hand:
        return out
    # the independent computation, on the weights before the step
    with torch.no_grad():
        for name, p in _module(run).named_parameters():
            p.copy_(weights[name])
    out["hand"], out["hand_loss"] = _hand_grads(run, mine, lam, BUDGET)
    out["hand_stats"] = run.controller.report().as_dict()  # what the hand forwards counted
    # the same step without elastic training, from the same weights and controller state
    with torch.no_grad():
        for name, p in _module(run).named_parameters():
            p.copy_(weights[name])
    run.controller.load_state_dict(controller)
    run.cfg = dataclasses.replace(run.cfg, moe_relu_elastic_budgets=[],
                                  moe_relu_elastic_prob=0.5, moe_relu_elastic_full_pass=False)
    plain = train_step(run, iter(mine))
    out["plain"] = {"metrics": plain.metrics,
                    "controller": copy.deepcopy(run.controller.state_dict())}
    return out


@pytest.fixture(scope="module")
def one_process():
    return run_workers(_step_worker, 1, [], True, timeout=200)[0]


def _assert_grads_close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name].float(), g.float(), rtol=2e-4, atol=2e-7,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def test_drawn_step_gradient_is_plain_plus_dialled_lm(one_process):
    out = one_process
    assert out["metrics"]["elastic_budget"] == BUDGET
    _assert_grads_close(out["grads"], out["hand"], "trainer vs by hand")
    # the test sees the L1 term: the router gradients move by more than the tolerance without it
    router = [n for n in out["hand"] if "router" in n]
    assert router and all(out["hand"][n].abs().max() > 1e-4 for n in router)


def test_drawn_step_logs_the_full_pass_and_keeps_the_controller_of_a_plain_step(one_process):
    out, plain = one_process, one_process["plain"]
    assert "elastic_budget" not in plain["metrics"]
    # the logged loss and the routing statistics are the full pass's: a plain step's
    for key in ("lm_loss", "moe_relu_sparsity", "l1_reg_loss", "moe_relu_l1_reg_coeff"):
        assert out["metrics"][key] == plain["metrics"][key], key
    # the dialled pass's loss is logged beside it
    assert out["metrics"]["lm_loss"] == pytest.approx(out["hand_loss"]["full"], rel=1e-6)
    assert out["metrics"]["elastic_dialled_lm_loss"] == pytest.approx(
        out["hand_loss"]["dialled"], rel=1e-6)
    assert abs(out["hand_loss"]["dialled"] - out["hand_loss"]["full"]) > 1e-4
    # lambda (and the rule's state) after the step: as after the plain step
    assert out["controller"].keys() == plain["controller"].keys()
    for key, value in plain["controller"].items():
        got = out["controller"][key]
        if torch.is_tensor(value):
            assert torch.equal(got, value), key
        else:
            assert got == value, key
    # the summed gradient is larger than the plain step's
    assert out["metrics"]["grad_norm"] > plain["metrics"]["grad_norm"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("extra", [
    [], ["--overlap-grad-reduce"], ["--use-distributed-optimizer", "--overlap-grad-reduce"],
    ["--pipeline-model-parallel-size", "2"]], ids=["ddp", "overlap", "distopt", "pp2"])
def test_two_ranks_give_the_one_process_gradients(one_process, extra):
    want = one_process
    pipeline = "--pipeline-model-parallel-size" in extra
    ranks = run_workers(_step_worker, 2, extra, False, want["weights"] if pipeline else None,
                        timeout=200)
    assert all(r["metrics"]["elastic_budget"] == BUDGET for r in ranks)
    for r in ranks:
        assert r["metrics"]["lm_loss"] == pytest.approx(want["metrics"]["lm_loss"], rel=1e-6)
        assert r["metrics"]["elastic_dialled_lm_loss"] == pytest.approx(
            want["metrics"]["elastic_dialled_lm_loss"], rel=1e-6)
        assert r["metrics"]["grad_norm"] == pytest.approx(want["metrics"]["grad_norm"],
                                                          rel=1e-5)
    if "--use-distributed-optimizer" in extra:
        return  # the buffer holds each rank's reduced shard only: the norm above covers it
    if pipeline:  # each stage holds its own layers; together they hold the model
        stages = {**ranks[0]["grads"], **ranks[1]["grads"]}
        assert not ranks[0]["grads"].keys() & ranks[1]["grads"].keys()
        _assert_grads_close(stages, want["grads"], "2 stages vs 1 process")
        return
    for rank, r in enumerate(ranks):
        _assert_grads_close(r["grads"], want["grads"], f"rank {rank} vs 1 process")


def test_recomputed_forward_gives_the_same_gradients(one_process):
    """Full activation recompute: each recomputed forward sees its pass's budget (and the L1
    term of the full pass only)."""
    out = run_workers(_step_worker, 1, ["--recompute-granularity", "full", "--recompute-method",
                                        "uniform", "--recompute-num-layers", "1"], False,
                      timeout=200)[0]
    assert out["metrics"]["lm_loss"] == pytest.approx(one_process["metrics"]["lm_loss"],
                                                      rel=1e-6)
    _assert_grads_close(out["grads"], one_process["grads"], "recompute vs none")


# ---- the trainer ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("data"))


FULL_PASS = ["--moe-relu-elastic-budgets", "0.5", "0.25", "--moe-relu-elastic-prob", "0.5",
             "--moe-relu-elastic-full-pass"]
KEYS = ("lm_loss", "moe_relu_l1_reg_coeff", "moe_relu_sparsity", "grad_norm", "l1_reg_loss",
        "elastic_budget", "lr")


@pytest.mark.multiprocess
def test_full_pass_resume_equals_uninterrupted_run(data, tmp_path):
    base = MODEL + data_args(data) + ["--train-iters", "6", "--eval-iters", "0", "--seed", "1"] \
        + FULL_PASS
    a, b = uninterrupted_and_resumed(base, tmp_path)
    assert len(a) == 6
    budgets = [r["elastic_budget"] for r in a]
    # seed 1: a drawn step before the interruption, drawn and plain steps after it
    assert any(x < 1 for x in budgets[:3]), budgets
    assert 1.0 in budgets[3:] and any(x < 1 for x in budgets[3:]), budgets
    assert [("elastic_dialled_lm_loss" in r) for r in a] == [x < 1 for x in budgets]
    for x, y in zip(a, b):
        for key in KEYS:
            assert x[key] == y[key], (x["iteration"], key, x[key], y[key])
        assert x.get("elastic_dialled_lm_loss") == y.get("elastic_dialled_lm_loss")


def test_full_pass_grid_is_the_elastic_grid_plus_the_flag():
    from megatron.remoe import ablation as ab

    folder = os.path.join(ROOT, "examples", "remoe", "ablations")
    grid = ab.load_grid(os.path.join(folder, "cpu-converge-elastic-full.yaml"))
    elastic = ab.load_grid(os.path.join(folder, "cpu-converge-elastic.yaml"))
    assert [r.name for r in grid.runs] == ["relu-s1", "relu-s2", "relu-s3"]
    assert grid.out != elastic.out
    for r in grid.runs:
        assert r.fields == dict(elastic.run(r.name).fields, moe_relu_elastic_full_pass=True)


# ---- config -------------------------------------------------------------------------------
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--train-iters", "2", "--mock-data", "--vocab-size", "128"]


def test_full_pass_without_budgets_is_a_one_line_error():
    from megatron.remoe.training.arguments import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(BASE + ["--moe-relu-elastic-full-pass"], world_size=1, cuda=False)
    assert "without moe_relu_elastic_budgets" in str(e.value) and "\n" not in str(e.value)
    cfg = parse_config(BASE + ["--moe-relu-elastic-budgets", "0.5",
                               "--moe-relu-elastic-full-pass"], world_size=1, cuda=False)
    assert cfg.moe_relu_elastic_full_pass
    assert not parse_config(BASE, world_size=1, cuda=False).moe_relu_elastic_full_pass
    with pytest.raises(ConfigError) as e:
        parse_config(["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                      "--virtual-pipeline-model-parallel-size", "2", "--moe-relu-elastic-budgets",
                      "0.5", "--moe-relu-elastic-full-pass"] + BASE[2:], world_size=2, cuda=False)
    assert "interleaved" in str(e.value) and "\n" not in str(e.value)
