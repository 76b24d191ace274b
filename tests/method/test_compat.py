"""What differs between megatron-core releases (compat.py, cpu_backend.py) and the guards that keep
a version difference from producing a wrong model: router installation and the post-build router
check, the router's call signature, layer numbering of standalone MoE layers, the variable-k
dispatcher settings, CPU patching of modules megatron-core imports late, checkpoint writer
versions, and the console-noise filter. Runs on every supported megatron-core (docs/compat.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
import torch
from megatron.core import package_info

from megatron.remoe.compat import build_from_spec, mcore_at_least, mcore_version_string
from megatron.remoe.errors import ConfigError
from megatron.remoe.model import build_controller, build_gpt_model, build_transformer_config
from megatron.remoe.router import ReLURouter
from tests.helpers.moe_reference import FFN, E, H, K, canonical_weights, load_canonical
from tests.helpers.paths import ROOT

pytestmark = [pytest.mark.core, pytest.mark.timeout(180)]

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
             use_cpu_initialization=True, moe_token_dispatcher_type="alltoall",
             moe_router_dtype="fp32")


def small_config(router="relu", **kw):
    fields = dict(SMALL)
    fields.update(kw)
    return build_transformer_config(router=router, num_experts=4, moe_router_topk=1, **fields)


def routers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [type(m.router) for m in model.modules() if isinstance(m, MoELayer)]


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 600, text
    return text


# ---- router installation and the post-build guard ----------------------------------------------

@pytest.mark.parametrize("router", ["relu", "topk"])
def test_every_moe_layer_routes_as_configured(single_rank, router):
    from megatron.core.transformer.moe.router import TopKRouter

    model = build_gpt_model(small_config(router), vocab_size=64, max_sequence_length=16,
                            use_transformer_engine=False)
    assert routers(model) == [ReLURouter if router == "relu" else TopKRouter] * 2


def test_unswapped_router_is_refused_before_training(single_rank, monkeypatch):
    """A layer spec our router swap does not reach (as megatron-core 0.18's functools.partial MoE
    spec did) leaves TopKRouter in a ReLU model: building it must fail, in one line."""
    import megatron.remoe.spec as spec

    monkeypatch.setattr(spec, "moe_submodules", lambda mlp_spec: None)
    with pytest.raises(ConfigError) as err:
        build_gpt_model(small_config("relu"), vocab_size=64, max_sequence_length=16,
                        use_transformer_engine=False)
    text = one_line(err.value)
    assert "TopKRouter" in text and "router relu" in text and mcore_version_string() in text


def test_guard_refuses_a_relu_router_in_a_topk_config(single_rank):
    from megatron.remoe.spec import check_routers

    relu_model = build_gpt_model(small_config("relu"), vocab_size=64, max_sequence_length=16,
                                 use_transformer_engine=False)
    with pytest.raises(ConfigError, match="ReLURouter but the config says router topk"):
        check_routers(relu_model, small_config("topk"))
    assert check_routers([relu_model], small_config("relu")) == 2


def test_trainer_and_hf_loader_build_relu_routers(single_rank):
    """The trainer's builder (DDP-wrapped chunks) and the HF converter's loader."""
    from megatron.remoe.hf.to_hf import megatron_to_hf
    from megatron.remoe.hf.to_megatron import hf_to_megatron
    from megatron.remoe.training.arguments import parse_config
    from megatron.remoe.training.config import transformer_config
    from megatron.remoe.training.state import build_model

    cfg = parse_config(["--mock-data", "--vocab-size", "128", "--num-layers", "2",
                        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                        "--num-experts", "4", "--micro-batch-size", "1", "--global-batch-size",
                        "1", "--train-iters", "1", "--router", "relu"], world_size=1, cuda=False)
    tcfg = transformer_config(cfg, use_cpu_initialization=True)
    chunks = build_model(cfg, tcfg, 128, build_controller(tcfg), torch.device("cpu"))
    assert [r for chunk in chunks for r in routers(chunk)] == [ReLURouter] * 2

    model = build_gpt_model(small_config("relu"), vocab_size=64, max_sequence_length=16,
                            use_transformer_engine=False)
    hf, _ = megatron_to_hf(model, small_config("relu"), 64, 16)
    back, _ = hf_to_megatron(hf)
    assert routers(back) == [ReLURouter] * 2


# ---- the router's call signature and layer numbering (standalone MoELayer) ---------------------

def layer_config(num_layers=1, **kw):
    fields = dict(num_layers=num_layers, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN,
                  moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
                  moe_router_dtype="fp32", params_dtype=torch.float32)
    fields.update(kw)
    return build_transformer_config(router="relu", num_experts=E, moe_router_topk=K, **fields)


def standalone_layer(config, controller):
    """megatron-core's MoELayer built from our spec and never given a layer number, as in
    megatron-core's own unit tests."""
    from megatron.remoe.spec import get_block_spec

    spec = get_block_spec(config, controller, use_transformer_engine=False)
    layer = build_from_spec(spec.layer_specs[0].submodules.mlp, config=config)
    load_canonical(layer, canonical_weights())
    return layer.train()


def routed_counts(layer, seed=5):
    x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(seed))
    out, _ = layer(x)
    out.sum().backward()
    gates = torch.relu(x.reshape(-1, H) @ canonical_weights()["router"].T)
    return (gates > 0).sum(0)


def test_one_layer_controller_takes_unset_zero_and_one(single_rank):
    cfg = layer_config(num_layers=1)
    ctrl = build_controller(cfg)
    layer = standalone_layer(cfg, ctrl)
    assert layer.router.layer_number is None
    for number in (None, 0, 1):
        if number is not None:
            layer.set_layer_number(number)
        want = routed_counts(layer)
        stats = ctrl.step()
        assert stats.layer_numbers == [1]
        assert torch.equal(stats.tokens_per_expert[0], want)


def test_multi_layer_controller_numbering(single_rank):
    cfg = layer_config(num_layers=4)
    ctrl = build_controller(cfg)
    layer = standalone_layer(cfg, ctrl)
    with pytest.raises(ConfigError) as err:  # unset: refused at the first count, nothing recorded
        routed_counts(layer)
    assert "set_layer_number" in one_line(err.value)
    assert int(ctrl.counts.sum()) == 0
    for bad in (0, 5, -1, 2.0):  # refused while the model is built
        with pytest.raises(ConfigError, match=f"layer_number={bad!r}"):
            layer.set_layer_number(bad)
    layer.set_layer_number(3)  # e.g. the first layer of the second pipeline stage
    want = routed_counts(layer)
    stats = ctrl.step()
    assert stats.layer_numbers == [3]
    assert torch.equal(stats.tokens_per_expert[0], want)


def test_router_accepts_what_newer_releases_pass(single_rank):
    cfg = layer_config(num_layers=2)
    ctrl = build_controller(cfg)
    router = ReLURouter(config=cfg, controller=ctrl, layer_number=2, is_mtp_layer=False)
    assert router.layer_number == 2
    router.train()
    with torch.no_grad():
        router.weight.copy_(canonical_weights()["router"])
    x = torch.randn(4, 1, H, generator=torch.Generator().manual_seed(2))
    probs, routing_map = router(x, None, torch.zeros(4, 1, dtype=torch.long), None)
    torch.testing.assert_close(probs, torch.relu(x.reshape(-1, H) @ router.weight.T))
    assert ctrl.step().layer_numbers == [2]
    with pytest.raises(ConfigError, match="multi-token-prediction"):
        ReLURouter(config=cfg, controller=ctrl, is_mtp_layer=True)
    with pytest.raises(ConfigError, match="layer_number=3"):
        ReLURouter(config=cfg, controller=ctrl, layer_number=3)


# ---- variable k through the dispatchers ---------------------------------------------------------

def test_alltoall_capacity_is_set_only_when_the_user_did_not():
    unset = layer_config()
    if mcore_at_least(0, 17):  # dropless alltoall sizes its permutation as tokens * topk
        assert unset.moe_expert_capacity_factor == E / K
    else:
        assert unset.moe_expert_capacity_factor is None
    assert layer_config(moe_expert_capacity_factor=2.5 * E / K).moe_expert_capacity_factor == \
        2.5 * E / K
    with pytest.raises(ConfigError, match="capacity_factor=1.0"):
        layer_config(moe_expert_capacity_factor=1.0)
    assert layer_config(moe_token_dispatcher_type="allgather").moe_expert_capacity_factor is None


@pytest.mark.parametrize("bad, needle", [
    (dict(moe_token_dispatcher_type="flex"), "alltoall or allgather"),
    (dict(moe_token_dispatcher_type="flex", moe_enable_deepep=True), "DeepEP"),
    (dict(moe_enable_routing_replay=True), "routing_replay"),
])
def test_fixed_k_features_are_refused_in_one_line(bad, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        layer_config(**bad)
    one_line(err.value)


# ---- MoE metrics: megatron-core's tracker (0.18+) or its module functions (0.16/0.17) ------------

def test_topk_aux_loss_is_reported_and_cleared(single_rank):
    from megatron.remoe.compat import clear_moe_metrics, report_moe_metrics

    cfg = small_config("topk")
    model = build_gpt_model(cfg, vocab_size=64, max_sequence_length=16,
                            use_transformer_engine=False).train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    report = dict(loss_scale=1.0, iteration=1, force_initialize=True,
                  track_names=["load_balancing_loss"], num_layers=cfg.num_layers,
                  moe_layer_freq=cfg.moe_layer_freq)

    def step_and_report(clear_first=False):
        model(ids, pos, None, labels=ids).float().mean().backward()
        if clear_first:
            clear_moe_metrics()
        out = {}
        report_moe_metrics(total_loss_dict=out, **report)
        return float(out["load_balancing_loss"])

    value = step_and_report()  # the Switch loss of a TopK router is positive
    assert 0 < value < float("inf")
    assert step_and_report(clear_first=True) == 0.0


# ---- CPU backend: modules megatron-core imports late --------------------------------------------

def test_modules_imported_after_the_backend_are_patched(single_rank):
    import importlib

    from megatron.remoe.cpu.backend import apply_cpu_backend

    if not apply_cpu_backend():
        pytest.skip("CUDA machine: the CPU backend is off")
    name = "megatron.core.dist_checkpointing.strategies.state_dict_saver"
    original = sys.modules.pop(name, None)
    try:
        fresh = importlib.import_module(name)  # executed now, after apply_cpu_backend()
        assert fresh.torch is not torch
        fresh.torch.cuda.synchronize()  # real torch: "Found no NVIDIA driver" / not compiled
        assert fresh.torch.cuda.current_device() == torch.device("cpu")
    finally:
        if original is not None:
            sys.modules[name] = original


def test_gradient_clipping_scales_in_place_with_megatron_cores_values(single_rank):
    """On CPU, megatron-core's clipping runs the bridge's in-place scale (one pass, no temporary)
    and gives bit for bit the gradients of its own fallback (`src * scale` copied back)."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_scale

    from megatron.remoe.cpu.backend import apply_cpu_backend

    if not apply_cpu_backend():
        pytest.skip("CUDA machine: the CPU backend is off")
    assert clip_grads.multi_tensor_scale_impl is not local_multi_tensor_scale
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (7, 4096, 100_003)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 5
    expected = [p.grad.clone() for p in params]
    total_norm = float(torch.norm(torch.stack([torch.norm(g) for g in expected])))
    coeff = 1.0 / (total_norm + 1.0e-6)
    local_multi_tensor_scale(None, None, [expected, expected], coeff)  # megatron-core's fallback
    grads_before = [p.grad for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total_norm)
    assert all(p.grad is g for p, g in zip(params, grads_before, strict=True))  # in place
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.grad, e)
    assert float(torch.norm(torch.stack([torch.norm(p.grad) for p in params]))) < 1.0 + 1e-5


# ---- checkpoint writer versions -----------------------------------------------------------------

def fake_checkpoint(path, writer=None, files=(".metadata", "metadata.json", "__0_0.distcp")):
    from megatron.remoe.training.checkpointing import MANIFEST

    os.makedirs(path)
    for name in files:
        with open(os.path.join(path, name), "w") as fh:
            fh.write("x")
    manifest = {"iteration": 1, "files": {}}
    if writer:
        manifest["writer"] = {"megatron_core": writer}
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    return str(path)


def test_checkpoint_of_a_newer_megatron_core_is_refused_by_name(tmp_path):
    from megatron.remoe.training.checkpointing import check_writer_version, writer_versions

    # what the manifest records, against what is installed, read without the package's helpers
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project_version = tomllib.load(fh)["project"]["version"]
    assert writer_versions() == {
        "megatron_core": re.match(r"\d+\.\d+\.\d+", package_info.__version__).group(0),
        "torch": re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0),
        "megatron_remoe": project_version}
    check_writer_version(fake_checkpoint(tmp_path / "same", mcore_version_string(),
                                         files=(".metadata", "common.pt")))
    check_writer_version(fake_checkpoint(tmp_path / "old", "0.16.1",
                                         files=(".metadata", "common.pt")))
    with pytest.raises(ConfigError) as err:
        check_writer_version(fake_checkpoint(tmp_path / "new", "99.1.0"))
    text = one_line(err.value)
    assert "written by megatron-core 99.1.0" in text and mcore_version_string() in text
    assert "corrupt" not in text
    # recorded before writer versions were: told apart by 0.19's layout (no common.pt)
    unrecorded = fake_checkpoint(tmp_path / "unrecorded")
    if mcore_at_least(0, 19):
        check_writer_version(unrecorded)
    else:
        with pytest.raises(ConfigError, match="megatron-core >= 0.19"):
            check_writer_version(unrecorded)


# ---- console noise ------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_known_noise_is_filtered_and_real_warnings_still_show(tmp_path):
    """A fresh process that sets up the entry points' console (logs.configure, what `remoe` and
    `python -m megatron.remoe.pretrain` do first), imports the trainer and builds a model prints
    nothing on stderr; a warning that is not on the known list still does."""
    script = (
        "import warnings\n"
        "from megatron.remoe.logs import configure\n"
        "configure()\n"
        "from megatron.remoe.training.distributed import ParallelConfig, init_distributed\n"
        "from megatron.remoe.model import build_gpt_model, build_transformer_config\n"
        "import megatron.remoe.training.loop\n"
        "init_distributed(ParallelConfig(), seed=1)\n"
        "cfg = build_transformer_config(router='relu', num_experts=4, moe_router_topk=1, "
        "num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, "
        "use_cpu_initialization=True, moe_layer_freq=[1, 0])\n"
        "build_gpt_model(cfg, vocab_size=64, max_sequence_length=16, "
        "use_transformer_engine=False)\n"
        "warnings.warn('a real warning')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("PYTHONWARNINGS", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "UserWarning: a real warning" in lines[0], proc.stderr
