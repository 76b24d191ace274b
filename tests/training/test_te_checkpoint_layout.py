"""Checkpoints move between --transformer-impl transformer_engine and local (issue 24, item 2).

megatron-core's TE spec saves an MoE layer's pre-MLP norm as `pre_mlp_layernorm.weight` (+ TE's
`_extra_state`), its local spec as `mlp.linear_fc1.layer_norm_weight`; the paper-scale configs
train with TE and every offline tool rebuilds the local spec. TE is emulated on CPU
(tests/helpers/te_layout.py: the local spec with the MoE layers' key map entry removed and a norm
carrying TE's extra state), through the project's own spec, trainer and save path:

* the spec: TE and local MoE models have one set of checkpoint keys and load each other's state;
* a checkpoint of the TE build, and one in the layout TE runs wrote before the fix, load in the
  offline tools (HF export with --verify, routing analysis, the dial's loader) with the MoE norm
  weights as stored (read back by their key, independently of either spec);
* save -> resume with the other transformer_impl (local -> TE, TE -> local, old TE layout ->
  local and -> TE) continues bit-exactly like the uninterrupted local run (the emulation computes
  what the local model computes), optimizer state included;
* the one state that cannot move (distributed-optimizer 'dp_reshardable' buckets, laid out in
  parameter order) is refused in one line naming transformer_impl and the fix.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import te_layout
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import pretrain_cmd
from tools.parity.tiny_gpt import MODEL, build_corpus, data_args, pretrain_env, read_metrics

pytestmark = pytest.mark.timeout(600)

TE_NORM_KEY = "decoder.layers.pre_mlp_layernorm.weight"  # megatron-core's TE spec (MoE layers)
LOCAL_NORM_KEY = "decoder.layers.mlp.linear_fc1.layer_norm_weight"  # its local spec
SAVED_AT, ITERS = 3, 6


def train(mode: str, args: list, timeout: float = 240):
    """The trainer on one process; mode "local", or a TE emulation of tests/helpers/te_layout."""
    if mode == "local":
        cmd = pretrain_cmd()
    else:
        cmd = [sys.executable, "-m", "tests.helpers.te_layout", mode]
        args = list(args) + ["--transformer-impl", "transformer_engine"]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, env=pretrain_env(),
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc


class Runs:
    """The uninterrupted local run and runs stopped after step SAVED_AT in each layout, each
    trained the first time a test asks for it."""

    def __init__(self, root):
        self.root = root
        self.base = MODEL + data_args(build_corpus(root / "data")) + \
            ["--train-iters", str(ITERS), "--eval-iters", "0"]
        self._full, self._parts = None, {}

    @property
    def full(self) -> list:
        if self._full is None:
            save = str(self.root / "full")
            train("local", self.base + ["--save", save])
            self._full = read_metrics(os.path.join(save, "metrics.jsonl"))
        return self._full

    def part(self, mode: str) -> str:
        if mode not in self._parts:
            save = str(self.root / f"part_{mode}")
            train(mode, self.base + ["--save", save, "--exit-interval", str(SAVED_AT)])
            self._parts[mode] = save
        return self._parts[mode]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("te_layout"))


def saved_tensor(path: str, key: str) -> torch.Tensor:
    """The full tensor stored under `key` in checkpoint directory `path`, read by its key alone."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    shape = dist_checkpointing.load_tensors_metadata(path)[key].global_shape
    request = {"t": ShardedTensor.from_rank_offsets(key, torch.empty(shape), replica_id=0)}
    return dist_checkpointing.load(request, path)["t"]


@pytest.mark.multiprocess
def test_emulation_writes_te_layout_before_the_fix_and_local_keys_after(runs):
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    def keys(mode):  # ShardedObjects are listed per shard ('.../shard_0.0_2.4')
        path = os.path.join(runs.part(mode), f"iter_{SAVED_AT:07d}")
        return {key.split("/shard_")[0] for key in load_sharded_metadata(path)}

    old = keys("te_before_fix")
    assert TE_NORM_KEY in old and LOCAL_NORM_KEY not in old
    assert "decoder.layers.pre_mlp_layernorm._extra_state" in old  # TE's norm state
    assert keys("te") == keys("local")


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", [pytest.param(m, marks=[pytest.mark.core] if m == "te" else [])
                                  for m in te_layout.MODES])
def test_te_checkpoint_loads_in_every_offline_tool(runs, mode, tmp_path, single_rank):
    from megatron.remoe.analysis.checkpoint import load_checkpoint_model
    from megatron.remoe.dial_calibration.inputs import load_model
    from megatron.remoe.hf.folders import load_hf_folder
    from megatron.remoe.hf.to_hf import megatron_checkpoint_to_hf

    load = runs.part(mode)
    path = os.path.join(load, f"iter_{SAVED_AT:07d}")
    stored = saved_tensor(path, TE_NORM_KEY if mode == "te_before_fix" else LOCAL_NORM_KEY)
    assert not torch.equal(stored, torch.ones_like(stored))  # trained: a wrong load would show

    def moe_norms(model):
        return torch.stack([layer.pre_mlp_layernorm.weight.detach()
                            for layer in model.decoder.layers])

    model, _, _ = load_checkpoint_model(load)  # routing analysis
    assert torch.equal(moe_norms(model), stored)
    loaded = load_model(load)  # the compute dial's calibration
    assert torch.equal(moe_norms(loaded.model), stored)
    out = str(tmp_path / "hf")
    summary = megatron_checkpoint_to_hf(load, out, verify=True)
    assert summary["iteration"] == SAVED_AT
    hf, _ = load_hf_folder(out)
    hf_norms = torch.stack([layer.post_attention_layernorm.weight.detach()
                            for layer in hf.model.layers])
    assert torch.equal(hf_norms, stored)


def _model_keys_and_state(monkeypatch, mode, moe_layer_freq):
    """(checkpoint keys, torch state dict, model) of a tiny ReLU MoE model built by the project's
    spec with `mode` ("local" or a TE emulation)."""
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from megatron.remoe.model import build_gpt_model
    from megatron.remoe.training.config import TrainConfig, transformer_config

    if mode != "local":
        te_layout.install(mode, lambda obj, name, value: monkeypatch.setattr(obj, name, value,
                                                                              raising=False))
    cfg = TrainConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      seq_length=16, num_experts=4, moe_router_topk=1, router="relu",
                      moe_relu_routing=True, moe_layer_freq=moe_layer_freq, vocab_size=64,
                      mock_data=True, train_iters=1)
    torch.manual_seed(0 if mode == "local" else 1)  # different weights: loading must move them
    model = build_gpt_model(transformer_config(cfg, use_cpu_initialization=True), vocab_size=64,
                            max_sequence_length=16, use_transformer_engine=mode != "local")
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    keys = {v.key for v in nested_values(model.sharded_state_dict()) if isinstance(v, ShardedBase)}
    monkeypatch.undo()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    return keys, state, model


@pytest.mark.core
@pytest.mark.parametrize("moe_layer_freq", [1, [1, 0]], ids=["all_moe", "moe_and_dense"])
def test_te_and_local_moe_models_share_checkpoint_keys(monkeypatch, single_rank, moe_layer_freq):
    local_keys, local_state, local = _model_keys_and_state(monkeypatch, "local", moe_layer_freq)
    te_keys, te_state, te = _model_keys_and_state(monkeypatch, "te", moe_layer_freq)
    old_keys, _, _ = _model_keys_and_state(monkeypatch, "te_before_fix", moe_layer_freq)
    assert te_keys == local_keys
    assert {k for k in old_keys - local_keys if "pre_mlp_layernorm" in k}  # the emulation is TE's
    norm = te.decoder.layers[0].pre_mlp_layernorm
    assert norm.get_extra_state().numel() == 0  # still TE's norm, extra state kept out of saves
    assert not [k for k in te_state if k.endswith("pre_mlp_layernorm._extra_state")]
    assert any(not torch.equal(v, local_state[k]) for k, v in te_state.items()
               if torch.is_tensor(v))
    te.load_state_dict(local_state, strict=True)  # no TE extra state in a local state dict
    local.load_state_dict(te_state, strict=True)
    for loaded, model in ((te_state, local), (local_state, te)):
        for name, value in model.state_dict().items():
            assert not torch.is_tensor(value) or torch.equal(value, loaded[name]), name


@pytest.mark.core
def test_dp_reshardable_optimizer_state_does_not_cross_transformer_impl(tmp_path):
    from megatron.remoe.errors import ConfigError
    from megatron.remoe.training.checkpointing.load import check_optimizer_reshardable
    from megatron.remoe.training.config import TrainConfig

    layout = {"world_size": 1, "tp": 1, "pp": 1, "vp": None, "ep": 1, "cp": 1}
    saved_cfg = {"use_distributed_optimizer": True, "transformer_impl": "transformer_engine"}
    cfg = TrainConfig(use_distributed_optimizer=True, transformer_impl="local")
    with pytest.raises(ConfigError) as error:
        check_optimizer_reshardable("ckpt", layout, layout, saved_cfg, cfg,
                                    {"distrib_optim_sharding_type": "dp_reshardable"})
    message = str(error.value)
    assert "\n" not in message and "transformer_impl=transformer_engine" in message
    assert "--no-load-optim" in message and "--transformer-impl transformer_engine" in message
    # per-parameter formats map by name: allowed
    check_optimizer_reshardable("ckpt", layout, layout, saved_cfg, cfg,
                                {"distrib_optim_sharding_type": "fully_reshardable"})


RESUMES = [("local", "te"), ("te", "local"), ("te_before_fix", "local"), ("te_before_fix", "te")]


@pytest.mark.multiprocess
@pytest.mark.parametrize("first,then", [
    pytest.param(a, b, id=f"{a}-to-{b}", marks=[pytest.mark.core] if (a, b) == ("te", "local") else [])
    for a, b in RESUMES])
def test_resume_with_the_other_transformer_impl_equals_uninterrupted_run(runs, first, then):
    save = str(runs.root / f"resumed_{first}_{then}")
    out = train(then, runs.base + ["--load", runs.part(first), "--save", save])
    assert "resumed from" in out.stdout and f"iteration {SAVED_AT}" in out.stdout, out.stdout
    resumed = read_metrics(os.path.join(save, "metrics.jsonl"))
    assert [r["iteration"] for r in resumed] == list(range(SAVED_AT + 1, ITERS + 1))
    for x, y in zip(runs.full[SAVED_AT:], resumed, strict=True):  # weights, Adam state, lambda: bit-exact
        for key in ("lm_loss", "moe_relu_l1_reg_coeff", "moe_relu_sparsity", "lr", "grad_norm"):
            assert x[key] == y[key], (first, then, x["iteration"], key, x[key], y[key])
