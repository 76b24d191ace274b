"""Elastic training (megatron/remoe/elastic.py): a seeded share of steps trains with the compute
dial's cut.

* the cut keeps exactly round(f x P) of the P positive gates, the largest ones, with their values
  (against an independent numpy ranking), and the router dispatches that in training while the L1
  term and the controller's counts stay on the undialled gates (independent count from the
  router's logits); eval forwards ignore the budget;
* draws: a pure function of (seed, iteration), the configured share and budgets, identical on two
  gloo ranks whose global RNGs differ;
* the trainer: the default path has no elastic metric and, with the option on, every step before
  the first dialled one is bit-identical to the default run (loss, grad norm, lambda, sparsity);
  a run stopped and resumed through the checkpoint equals the uninterrupted run, bit for bit;
* bad settings are one-line ConfigErrors.
"""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron.remoe import elastic as EL
from megatron.remoe.errors import ConfigError
from megatron.remoe.router import set_elastic_budget
from megatron.remoe.training.step import begin_elastic_step
from tests.helpers.dist_utils import run_workers
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import run_pretrain, uninterrupted_and_resumed
from tools.parity.tiny_gpt import MODEL, build_corpus, data_args, read_metrics

pytestmark = pytest.mark.timeout(170)

SMALL = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, use_cpu_initialization=True, init_method_std=0.02,
             moe_router_dtype="fp32")


# ---- the cut --------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1, 0.9])
def test_cut_keeps_the_largest_positive_gates_exactly(fraction):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 8, generator=g)
    probs = torch.relu(logits)
    probs[5] = 0.0  # a token with no expert
    routing_map = probs > 0
    cut, keep = EL.elastic_cut(probs, routing_map, fraction)
    flat = probs.numpy().reshape(-1)
    positive = int((flat > 0).sum())
    n = int(np.round(positive * fraction))
    expected = np.zeros_like(flat, dtype=bool)
    expected[np.argsort(-flat, kind="stable")[:n]] = True
    assert keep.numpy().reshape(-1).tolist() == expected.tolist()
    assert int(keep.sum()) == n
    assert torch.equal(cut[keep], probs[keep]) and not cut[~keep].any()


def test_cut_passes_gradients_to_kept_gates_only():
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    probs = torch.relu(logits)
    cut, keep = EL.elastic_cut(probs, probs > 0, 0.5)
    cut.sum().backward()
    assert torch.equal(logits.grad, keep.to(logits.grad.dtype))


# ---- draws ----------------------------------------------------------------------------------
def test_draws_are_seeded_and_follow_the_configured_share():
    opts = EL.ElasticOptions((0.5, 0.25), prob=0.3, mode="step", seed=7)
    draws = [opts.draw(i, [1, 2]) for i in range(1, 2001)]
    assert draws == [opts.draw(i, [1, 2]) for i in range(1, 2001)]  # pure function
    torch.manual_seed(99)
    np.random.seed(99)  # the global RNGs play no part
    assert draws[:50] == [opts.draw(i, [1, 2]) for i in range(1, 51)]
    dialled = [d for d in draws if d is not None]
    assert set(dialled) == {0.5, 0.25}
    assert abs(len(dialled) / len(draws) - 0.3) < 0.04
    assert abs(dialled.count(0.5) / len(dialled) - 0.5) < 0.06
    other = EL.ElasticOptions((0.5, 0.25), prob=0.3, mode="step", seed=8)
    assert [other.draw(i, [1, 2]) for i in range(1, 201)] != draws[:200]
    layer = EL.ElasticOptions((0.5,), prob=0.5, mode="layer", seed=7)
    per_layer = [layer.draw(i, [1, 3]) for i in range(1, 401)]
    seen = {k for d in per_layer if d for k in d}
    assert seen == {1, 3}
    cut_share = sum(len(d or {}) for d in per_layer) / (2 * len(per_layer))
    assert abs(cut_share - 0.5) < 0.06


def _draws_on_rank(rank, world_size):
    import torch.distributed as dist

    from megatron.remoe.model import build_gpt_model, build_transformer_config
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    torch.manual_seed(100 + rank)  # different global RNG states on the two ranks
    np.random.seed(100 + rank)
    tcfg = build_transformer_config(router="relu", num_experts=4, moe_router_topk=1,
                                    moe_layer_freq=[1, 0, 1], **SMALL)
    model = build_gpt_model(tcfg, vocab_size=256, max_sequence_length=64, controller=None,
                            use_transformer_engine=False)
    cfg = SimpleNamespace(moe_relu_elastic_budgets=["0.5", "0.25"], moe_relu_elastic_prob=0.5,
                          moe_relu_elastic_mode="layer", seed=11)
    run = SimpleNamespace(cfg=cfg, tcfg=tcfg, model=[model], iteration=0)
    seen = []
    for it in range(40):
        run.iteration = it
        metrics = begin_elastic_step(run)
        budgets = [r.config.moe_relu_elastic_budget for r in
                   (m for m in model.modules() if type(m).__name__ == "ReLURouter")]
        seen.append((metrics["elastic_budget"], budgets))
    gathered = [None] * world_size
    dist.all_gather_object(gathered, seen)
    return gathered


@pytest.mark.multiprocess
def test_draws_are_identical_on_every_rank():
    per_rank = run_workers(_draws_on_rank, 2, timeout=120)
    a, b = per_rank[0]
    assert a == b and per_rank[1] == per_rank[0]
    budgets = [x[1][0] for x in a]
    assert any(x is None for x in budgets) and any(x is not None for x in budgets)


# ---- the router -----------------------------------------------------------------------------
def _build(seed=0):
    from megatron.remoe.controller import SparsityController
    from megatron.remoe.model import build_gpt_model, build_transformer_config

    torch.manual_seed(seed)
    tcfg = build_transformer_config(router="relu", num_experts=4, moe_router_topk=1,
                                    moe_layer_freq=[1, 0, 1], **SMALL)
    controller = SparsityController(3, 4, tcfg.target_sparsity)
    model = build_gpt_model(tcfg, vocab_size=256, max_sequence_length=64, controller=controller,
                            use_transformer_engine=False)
    with torch.no_grad():  # wide gate distributions: tokens with 0..4 experts
        for m in model.modules():
            if type(m).__name__ == "ReLURouter":
                m.weight.mul_(20)
    return model, tcfg, controller


def _routed(model, x, train=True):
    """Per MoE layer: undialled positive-gate count (independent: relu(input @ W) > 0) and the
    dispatched map; the model's logits."""
    seen, handles = {}, []
    for m in model.modules():
        if type(m).__name__ == "ReLURouter":
            n = m.layer_number
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(
                n, {}).update(positive=(a[0].float() @ mod.weight.float().t() > 0).reshape(
                    -1, mod.weight.shape[0]))))
            handles.append(m.register_forward_hook(
                lambda mod, a, o, n=n: seen.setdefault(n, {}).update(map=o[1].detach())))
    model.train(train)
    try:
        pos = torch.arange(x.shape[1]).expand_as(x)
        out = model(x, pos, None)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def test_router_dispatches_the_budget_and_counts_undialled_gates(single_rank):
    model, tcfg, controller = _build()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    for budget in (0.5, 0.25, {1: 0.5}):
        set_elastic_budget(model, budget)
        seen, _ = _routed(model, x)
        for layer, s in seen.items():
            positive = int(s["positive"].sum())
            fraction = EL.fraction_of(budget, layer)
            want = positive if fraction is None else round(positive * fraction)
            assert int(s["map"].sum()) == want, (budget, layer, positive)
            assert not (s["map"] & ~s["positive"]).any()
            # the controller counted the undialled gates
            row = controller.counts[layer - 1]
            assert int(row[:4].sum()) == positive, (budget, layer)
        controller.counts.zero_()
        controller.reg_sum.zero_()
    # evaluation ignores the budget: the same logits as undialled
    set_elastic_budget(model, 0.25)
    _, dialled_eval = _routed(model, x, train=False)
    set_elastic_budget(model, None)
    _, plain_eval = _routed(model, x, train=False)
    assert torch.equal(dialled_eval, plain_eval)


# ---- config -------------------------------------------------------------------------------
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--train-iters", "2", "--mock-data", "--vocab-size", "128"]


@pytest.mark.parametrize("extra,needle", [
    (["--moe-relu-elastic-budgets", "1.0"], "must be in (0, 1)"),
    (["--moe-relu-elastic-budgets", "0"], "must be in (0, 1)"),
    (["--moe-relu-elastic-budgets", "0.5", "0.5"], "twice"),
    (["--moe-relu-elastic-budgets", "0.5", "--moe-relu-elastic-prob", "0"], "(0, 1]"),
    (["--moe-relu-elastic-budgets", "0.5", "--moe-relu-elastic-prob", "1.5"], "(0, 1]"),
    (["--moe-relu-elastic-budgets", "0.5", "--router", "topk"], "ReLU routing"),
    (["--moe-relu-elastic-prob", "0.3"], "without moe_relu_elastic_budgets"),
    (["--moe-relu-elastic-mode", "layer"], "without moe_relu_elastic_budgets"),
])
def test_bad_settings_are_one_line_errors(extra, needle):
    from megatron.remoe.training.arguments import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(BASE + extra, world_size=1, cuda=False)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_budgets_are_read(tmp_path):
    from megatron.remoe.training.arguments import config_to_yaml, parse_config

    path = tmp_path / "c.yaml"
    path.write_text("moe_relu_elastic_budgets: [0.5, 0.25]\nmoe_relu_elastic_prob: 0.25\n")
    cfg = parse_config(BASE + ["--config", str(path)], world_size=1, cuda=False)
    opts = EL.elastic_options(cfg)
    assert opts.budgets == (0.5, 0.25) and opts.prob == 0.25 and opts.mode == "step"
    saved = tmp_path / "saved.yaml"  # the config a checkpoint carries reads back the same
    saved.write_text(config_to_yaml(cfg))
    assert parse_config(["--config", str(saved)], world_size=1, cuda=False) == cfg
    assert EL.elastic_options(parse_config(BASE, world_size=1, cuda=False)) is None


# ---- the trainer ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("data"))


ELASTIC = ["--moe-relu-elastic-budgets", "0.5", "0.25", "--moe-relu-elastic-prob", "0.5"]
KEYS = ("lm_loss", "moe_relu_l1_reg_coeff", "moe_relu_sparsity", "grad_norm", "l1_reg_loss")


@pytest.mark.multiprocess
def test_default_path_is_unchanged_until_the_first_cut(data, tmp_path):
    """With the option on, the steps before the first dialled one equal the default run bit for
    bit (the draws consume no RNG the run uses); the first dialled step differs; the default run
    logs no elastic metric."""
    base = MODEL + data_args(data) + ["--train-iters", "6", "--eval-iters", "0", "--seed", "5"]
    plain, elastic = str(tmp_path / "plain"), str(tmp_path / "elastic")
    run_pretrain(base + ["--save", plain])
    run_pretrain(base + ["--save", elastic] + ELASTIC)
    a = read_metrics(os.path.join(plain, "metrics.jsonl"))
    b = read_metrics(os.path.join(elastic, "metrics.jsonl"))
    assert all("elastic_budget" not in r for r in a)
    opts = EL.ElasticOptions((0.5, 0.25), 0.5, "step", 5)
    drawn = [opts.draw(i, [1, 2]) for i in range(1, 7)]
    assert [r["elastic_budget"] for r in b] == [d or 1.0 for d in drawn]
    first = next(i for i, d in enumerate(drawn) if d is not None)
    assert first >= 1, "seed 5 should start with undialled steps"  # keeps the test meaningful
    for x, y in zip(a[:first], b[:first]):
        for key in KEYS:
            assert x[key] == y[key], (x["iteration"], key)
    assert a[first]["lm_loss"] != b[first]["lm_loss"]


@pytest.mark.multiprocess
def test_elastic_resume_equals_uninterrupted_run(data, tmp_path):
    base = MODEL + data_args(data) + ["--train-iters", "6", "--eval-iters", "0", "--seed", "5"] \
        + ELASTIC
    a, b = uninterrupted_and_resumed(base, tmp_path)
    assert len(a) == 6
    budgets = [r["elastic_budget"] for r in a]
    assert 1.0 in budgets[3:] and any(x < 1 for x in budgets[3:]), budgets  # both after resume
    for x, y in zip(a, b):
        for key in KEYS + ("elastic_budget", "lr"):
            assert x[key] == y[key], (x["iteration"], key, x[key], y[key])


# ---- the grid ---------------------------------------------------------------------------------
def test_elastic_grid_is_cpu_converge_plus_the_elastic_fields(tmp_path):
    """cpu-converge-elastic: relu-s1..3 with the cpu-converge recipe (paired seeds) plus the
    elastic fields; the grid tool also takes the fields as axes."""
    from megatron.remoe import ablation as ab

    folder = os.path.join(ROOT, "examples", "remoe", "ablations")
    grid = ab.load_grid(os.path.join(folder, "cpu-converge-elastic.yaml"))
    plain = ab.load_grid(os.path.join(folder, "cpu-converge.yaml"))
    assert [r.name for r in grid.runs] == ["relu-s1", "relu-s2", "relu-s3"]
    elastic = {"moe_relu_elastic_budgets": [0.5, 0.25], "moe_relu_elastic_prob": 0.2,
               "moe_relu_elastic_mode": "step"}
    for r in grid.runs:
        assert r.fields == dict(plain.run(r.name).fields, **elastic), r.name
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, "
                    "seq_length: 32, train_iters: 2, mock_data: true, vocab_size: 128, "
                    "moe_relu_elastic_budgets: [0.5]}\naxes: {router: [relu], "
                    "moe_relu_elastic_prob: [0.25, 0.5], moe_relu_elastic_mode: [step, layer]}\n")
    names = [r.name for r in ab.expand(ab.load_grid(str(path)))]
    assert len(names) == 4 and len(set(names)) == 4


def test_recompute_dispatches_the_same_cut(single_rank):
    """Under activation recomputation the no-grad first forward and the recomputation with grad
    apply the same cut (a deterministic ranking): losses, counts and gradients equal the run
    without recompute."""
    from tests.method.test_recompute import run as run_recompute

    wide = dict(init_method_std=0.2)
    state, base, base_grads, base_losses = run_recompute("none", moe_relu_elastic_budget=0.25,
                                                         **wide)
    _, _, _, uncut_losses = run_recompute("none", state, **wide)
    assert (torch.stack(uncut_losses) - torch.stack(base_losses)).abs().min() > 1e-3
    for mode in ("full", "moe"):
        _, stats, grads, losses = run_recompute(mode, state, moe_relu_elastic_budget=0.25, **wide)
        torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), rtol=1e-6,
                                   atol=0, msg=mode)
        assert torch.equal(stats.tokens_per_expert, base.tokens_per_expert), mode
        for name, grad in base_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6,
                                       msg=f"{mode}: {name}")
