"""The lambda update rules (megatron/remoe/lambda_rules.py) against hand-written references.

* the paper's rule (the default) gives exactly the fp32 sequence lambda * 1.2^sign(target - S);
* ema / deadband / pi on a synthetic sparsity sequence (fed through real routing maps, so the
  controller's own sparsity and token count are used) against references written from the
  formulas in docs/training.md;
* the same lambda bits on every rank of a 2-process gloo world, equal to one process that sees all
  tokens;
* exact resume: save mid-sequence, load into a fresh controller, continue == uninterrupted, also
  through the trainer's checkpoints.
"""

import math

import numpy as np
import pytest
import torch

from megatron.remoe.controller import SparsityController
from megatron.remoe.errors import ConfigError
from megatron.remoe.lambda_rules import CONTROLLERS, ControllerOptions, sparsity_noise
from tests.helpers.dist_utils import run_workers
from tests.helpers.pretrain_utils import uninterrupted_and_resumed
from tools.parity.tiny_gpt import MODEL, build_corpus, data_args

pytestmark = pytest.mark.timeout(170)

E, LAYERS, TOKENS = 8, 2, 64  # 64 tokens per layer per step: sampling noise of S ~0.041
TARGET = 0.875
# Stage I/II (below target, rising), first reach at step 6, then noise around the target with
# a slow drift above it (steps 6..). Entries of a [TOKENS, E] map: S = 1 - active / (TOKENS*E).
ACTIVE = [300, 280, 200, 120, 80, 64, 60, 70, 130, 50, 58, 72, 90, 15, 62, 64, 56, 52, 48, 66,
          140, 61, 59, 44, 100, 12, 63]
SPARSITY = [1 - a / (TOKENS * E) for a in ACTIVE]


def routing_map(active: int, seed: int) -> torch.Tensor:
    """A [TOKENS, E] map with exactly `active` True entries (a fixed pseudo-random placement)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(TOKENS * E, dtype=torch.bool)
    flat[torch.randperm(TOKENS * E, generator=g)[:active]] = True
    return flat.view(TOKENS, E)


def drive(ctrl: SparsityController, steps, split=None) -> list:
    """Feed the synthetic steps through record()/step(); returns lambda after each update (fp32
    bits). `split=(rank, world)` records only this rank's share of the tokens."""
    out = []
    for t in steps:
        for layer in range(1, LAYERS + 1):
            m = routing_map(ACTIVE[t], seed=1000 * t + layer)
            if split is not None:
                rank, world = split
                m = m[rank * TOKENS // world:(rank + 1) * TOKENS // world]
            ctrl.record(layer, m, None, None)
        ctrl.step()
        out.append(np.float32(float(ctrl.l1_coeff)))
    return out


def make(kind: str, **kw) -> SparsityController:
    return SparsityController(num_layers=LAYERS, num_experts=E, target_sparsity=TARGET,
                              l1_coeff_init=1e-3, multiplier=1.2,
                              options=ControllerOptions(kind=kind, **kw))


# ------------------------------------------------------------------------------------------------
# hand-written references (numpy float32 for lambda, Python floats for the rule state)
# ------------------------------------------------------------------------------------------------
def ref_paper(lam, s):
    lam = np.float32(lam)
    new = lam * np.float32(1.2) if s < TARGET else lam / np.float32(1.2)
    return np.float32(min(max(new, np.float32(1e-30)), np.float32(1e4)))


def reference(kind: str, lam0=1e-3, beta=0.9, z=2.0, kp=2.0, ki=1.0) -> list:
    lam, reached, mean, prev, out = np.float32(lam0), False, None, None, []
    for s in SPARSITY:
        if not reached or kind == "paper":
            lam = ref_paper(lam, s)
        elif kind == "ema":
            mean = s if mean is None else beta * mean + (1 - beta) * s
            lam = ref_paper(lam, mean)
        elif kind == "deadband":
            if abs(s - TARGET) > z * math.sqrt(TARGET * (1 - TARGET) / TOKENS):
                lam = ref_paper(lam, s)
        elif kind == "pi":
            e = TARGET - s
            step = ki * e + kp * (e - (e if prev is None else prev))
            prev = e
            step = max(-math.log(1.2), min(math.log(1.2), step))
            lam = np.float32(float(lam) * math.exp(step))
        reached = reached or s >= TARGET
        out.append(lam)
    return out


def test_synthetic_sequence_crosses_the_target_and_is_noisy():
    """The sequence exercises every branch: Stage I/II below target, a first reach, then steps
    inside and outside the dead band on both sides."""
    reach = next(t for t, s in enumerate(SPARSITY) if s >= TARGET)
    assert reach == 5 and all(s < TARGET for s in SPARSITY[:reach])
    band = 2.0 * sparsity_noise(TARGET, TOKENS)
    after = SPARSITY[reach + 1:]
    assert any(abs(s - TARGET) <= band for s in after)
    assert any(s - TARGET > band for s in after) and any(TARGET - s > band for s in after)


def test_paper_rule_is_the_default_and_unchanged():
    default = SparsityController(num_layers=LAYERS, num_experts=E, target_sparsity=TARGET,
                                 l1_coeff_init=1e-3, multiplier=1.2)
    got = drive(default, range(len(ACTIVE)))
    assert got == reference("paper")  # exact fp32 values
    # the sign-only rule: every step multiplies or divides by 1.2 (in fp32)
    assert all(b in (np.float32(a * np.float32(1.2)), np.float32(a / np.float32(1.2)))
               for a, b in zip([np.float32(1e-3)] + got, got))
    assert default.rule.kind == "paper" and default.state_dict()["rule"] == {"kind": "paper"}


@pytest.mark.parametrize("kind", ["ema", "deadband", "pi"])
def test_options_match_reference(kind):
    got = drive(make(kind), range(len(ACTIVE)))
    want = reference(kind)
    assert got == want, kind  # the same float operations: exact
    paper = reference("paper")
    assert got[:6] == paper[:6]  # Stages I/II: the paper's rule for every option
    assert got != paper  # ... and the option acts in Stage III


@pytest.mark.parametrize("kind", CONTROLLERS)
def test_exact_resume_and_state_roundtrip(kind, tmp_path):
    full = drive(make(kind), range(len(ACTIVE)))
    first = make(kind)
    head = drive(first, range(9))
    path = tmp_path / "ctrl.pt"
    torch.save(first.state_dict(), path)
    second = make(kind)
    second.load_state_dict(torch.load(path, weights_only=True))
    tail = drive(second, range(9, len(ACTIVE)))
    assert head + tail == full  # bit for bit
    # a skipped (non-finite) step restores the state it had before, rule state included
    kept = second.state_dict()
    second.record(1, routing_map(10, 0), None, None)
    second.step()
    second.load_state_dict(kept)
    assert second.state_dict() == kept


def test_switching_rule_on_resume_starts_its_state_fresh():
    ema = make("ema")
    drive(ema, range(10))
    assert ema.state_dict()["rule"]["mean"] is not None
    pi = make("pi")
    pi.load_state_dict(ema.state_dict())
    assert pi.rule.prev_error is None and float(pi.l1_coeff) == float(ema.l1_coeff)


def _rank_worker(rank, world, kind):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctrl = make(kind)
        return [float(x) for x in drive(ctrl, range(len(ACTIVE)), split=(rank, world))]
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["ema", "deadband", "pi"])
def test_same_lambda_on_every_rank(kind):
    """Each rank records half of every step's tokens: after the all-reduce both ranks hold the
    same lambda, equal to one process recording all tokens."""
    per_rank = run_workers(_rank_worker, 2, kind, timeout=120)
    assert per_rank[0] == per_rank[1]
    assert per_rank[0] == [float(x) for x in drive(make(kind), range(len(ACTIVE)))]


@pytest.mark.parametrize("bad, needle", [
    (dict(kind="median"), "controller='median'"),
    (dict(kind="ema", ema_beta=1.0), "ema_beta=1.0"),
    (dict(kind="deadband", deadband_z=-1.0), "deadband_z=-1.0"),
    (dict(kind="pi", pi_ki=0.0), "pi_ki=0.0"),
])
def test_bad_options_are_one_line_errors(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make(**bad)


def test_flags_reach_the_controller():
    from megatron.remoe.model import build_controller
    from megatron.remoe.training.arguments import parse_config
    from megatron.remoe.training.config import transformer_config

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--mock-data", "--vocab-size", "128", "--train-iters", "2"]
    argv = base + ["--moe-relu-l1-reg-coeff-controller", "pi",
                   "--moe-relu-l1-reg-coeff-pi-kp", "2.5"]
    cfg = parse_config(argv, world_size=1, cuda=False)
    ctrl = build_controller(transformer_config(cfg, use_cpu_initialization=True))
    assert ctrl.rule.kind == "pi" and ctrl.rule.options.pi_kp == 2.5
    assert build_controller(transformer_config(parse_config(base, world_size=1, cuda=False),
                                               True)).rule.kind == "paper"
    with pytest.raises(ConfigError, match="pi_ki=-1"):
        parse_config(argv + ["--moe-relu-l1-reg-coeff-pi-ki", "-1"], world_size=1, cuda=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("data"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["pi"])
def test_trainer_resume_with_option(data, tmp_path, kind):
    """Through the trainer's checkpoints: a low target is reached at step 1, so the option acts
    from step 2; save at 3, resume, and lambda/loss equal the uninterrupted run bit for bit."""
    base = MODEL + data_args(data) + [
        "--train-iters", "6", "--eval-iters", "0", "--moe-relu-target-sparsity", "0.3",
        "--moe-relu-l1-reg-coeff-init", "1e-3", "--moe-relu-l1-reg-coeff-controller", kind,
        "--moe-relu-l1-reg-coeff-pi-kp", "0", "--moe-relu-l1-reg-coeff-pi-ki", "0.2"]
    a, b = uninterrupted_and_resumed(base, tmp_path)
    assert len(a) == 6
    for x, y in zip(a, b, strict=True):
        for key in ("lm_loss", "moe_relu_l1_reg_coeff", "moe_relu_sparsity"):
            assert x[key] == y[key], (x["iteration"], key, x[key], y[key])
    # the logged lambda is the one used during the step; step 1 reaches the target (the paper's
    # rule divides), then lambda_{t+1} = lambda_t * exp(ki * (target - S_t)) (kp = 0)
    coeffs = [r["moe_relu_l1_reg_coeff"] for r in a]
    sparsity = [r["moe_relu_sparsity"] for r in a]
    assert sparsity[0] >= 0.3 and coeffs[1] == pytest.approx(coeffs[0] / 1.2, rel=1e-6)
    for t in range(1, 5):
        assert coeffs[t + 1] == pytest.approx(coeffs[t] * math.exp(0.2 * (0.3 - sparsity[t])),
                                              rel=1e-6), t
