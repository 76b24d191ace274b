"""The trainer recipes of docs/integrations.md, as far as they run without a GPU: the example
scripts compile on every lane; with megatron-core >= 0.19 (which ships `megatron.training`), the
Megatron-LM script's ReMoE flags parse through Megatron-LM's own parser into a
ReMoETransformerConfig whose model config carries ReMoE's spec function, and the Megatron-Bridge
callback is registered and driven as Bridge's CallbackManager does, on a context object with
Bridge's attribute names. Megatron-LM's and Bridge's training loops need CUDA (and Bridge needs
Transformer Engine to import): the loops themselves are not run here."""

import importlib.util
import os
import py_compile
import sys
from types import SimpleNamespace

import pytest

from megatron.remoe.compat import mcore_at_least
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.core

MEGATRON_LM = os.path.join(ROOT, "examples", "megatron_lm", "pretrain_remoe.py")
BRIDGE = os.path.join(ROOT, "examples", "megatron_bridge", "remoe_recipe.py")
needs_megatron_training = pytest.mark.skipif(
    not mcore_at_least(0, 19) or importlib.util.find_spec("megatron.remoe.integration") is None,
    reason="megatron.training (GPTModelConfig, the 0.19 pretrain signature) ships with "
    "megatron-core >= 0.19 (the newest lane); the examples need megatron.remoe.integration")

# Megatron-LM's minimal GPT flags, then the ReMoE ones
MLM_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
             "--global-batch-size", "8", "--num-experts", "4", "--moe-router-topk", "1",
             "--moe-token-dispatcher-type", "alltoall", "--mock-data", "--vocab-size", "512",
             "--tokenizer-type", "NullTokenizer", "--transformer-impl", "local",
             "--train-iters", "10", "--lr", "1e-3"]
REMOE_FLAGS = ["--moe-relu-routing", "--moe-relu-l1-reg-coeff-init", "1e-3",
               "--moe-relu-l1-reg-coeff-multiplier", "1.5", "--moe-relu-no-load-balancing",
               "--moe-relu-target-sparsity", "0.7"]


def load_example(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [MEGATRON_LM, BRIDGE])
def test_examples_compile(path, tmp_path):
    py_compile.compile(path, cfile=str(tmp_path / "out.pyc"), doraise=True)


@pytest.mark.slow
@needs_megatron_training
def test_megatron_lm_flags_give_a_remoe_config_and_the_spec_function(monkeypatch, single_rank):
    from megatron.training.arguments import parse_args, validate_args

    from megatron.remoe.compat import moe_submodules
    from megatron.remoe.integration import controller_for, remoe_layer_spec
    from megatron.remoe.router import ReLURouter

    example = load_example(MEGATRON_LM, "pretrain_remoe_example")
    monkeypatch.setattr(sys, "argv", ["pretrain_remoe.py", *MLM_FLAGS, *REMOE_FLAGS])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    args = parse_args(example.add_remoe_args)  # Megatron-LM's own parser: no flag clashes
    validate_args(args, {})
    monkeypatch.setattr(example, "get_args", lambda: args)
    example.remoe_config.cache_clear()
    config = example.remoe_config()
    assert type(config).__name__ == "ReMoETransformerConfig" and config.moe_relu_routing
    assert (config.moe_relu_l1_reg_coeff_init, config.moe_relu_l1_reg_coeff_multiplier,
            config.moe_relu_load_balancing, config.moe_relu_target_sparsity) == (1e-3, 1.5, False,
                                                                                0.7)
    assert example.remoe_config() is config  # one config, so one controller for every chunk
    model_config = example.remoe_model_config(args)
    assert model_config.transformer is config
    assert model_config.transformer_layer_spec is remoe_layer_spec
    block = model_config.transformer_layer_spec(model_config, vp_stage=None)
    routers = [moe_submodules(layer.submodules.mlp).router for layer in block.layer_specs]
    controller = controller_for(config)
    assert len(routers) == 2 and all(r.func is ReLURouter and r.keywords["controller"] is
                                     controller for r in routers)
    assert float(controller.l1_coeff) == pytest.approx(1e-3)  # lambda_0 from the flag


@needs_megatron_training
def test_megatron_lm_attach_runs_once_after_the_trainers_setup(monkeypatch):
    example = load_example(MEGATRON_LM, "pretrain_remoe_example")
    model, optimizer, scheduler = [object()], object(), object()
    calls = []
    monkeypatch.setattr(example.training, "setup_model_and_optimizer",
                        lambda *a, **k: calls.append("setup") or (model, optimizer, scheduler))
    monkeypatch.setattr(example, "attach", lambda m, o: calls.append(("attach", m, o)))
    example.attach_after_setup()
    assert example.training.setup_model_and_optimizer("provider", "type") == \
        (model, optimizer, scheduler)
    assert calls == ["setup", ("attach", model, optimizer)]


class FakeBridgeCallbacks:
    """Megatron-Bridge's CallbackManager.add / fire rule (training/callbacks.py): a callback's
    method is registered for an event when the callback has a method of that name that is not
    the base class's no-op."""

    EVENTS = ("on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end",
              "on_eval_start", "on_eval_end", "on_checkpoint_save")

    def __init__(self, callback):
        self.handlers = {e: getattr(callback, e) for e in self.EVENTS
                         if getattr(callback, e, None) is not None}

    def fire(self, event, context):
        if event in self.handlers:
            self.handlers[event](context)


class Scalars:
    def __init__(self):
        self.written = []

    def add_scalar(self, key, value, step):
        self.written.append((key, value, step))


@needs_megatron_training
def test_bridge_callback_attaches_at_train_start_and_logs_after_each_step(monkeypatch):
    example = load_example(BRIDGE, "remoe_recipe_example")
    stats = SimpleNamespace(as_dict=lambda: {"moe_relu_sparsity": 0.8,
                                             "moe_relu_l1_reg_coeff": 2e-8})
    controller = SimpleNamespace(last_stats=None)
    attached = []
    monkeypatch.setattr(example, "attach",
                        lambda model, optimizer: attached.append((model, optimizer)) or controller)
    callback = example.ReMoECallback()
    manager = FakeBridgeCallbacks(callback)
    assert set(manager.handlers) == {"on_train_start", "on_train_step_end"}
    tensorboard = Scalars()
    state = SimpleNamespace(train_state=SimpleNamespace(step=0), tensorboard_logger=tensorboard,
                            wandb_logger=None)
    context = SimpleNamespace(state=state, model=["chunk"], user_state={}, optimizer="optimizer",
                              scheduler=None, loss_dict={}, grad_norm=None, skipped_iter=False)
    manager.fire("on_train_start", context)
    assert attached == [(["chunk"], "optimizer")]
    manager.fire("on_train_step_end", context)  # no statistics yet: nothing written
    assert tensorboard.written == []
    controller.last_stats = stats
    state.train_state.step = 4  # Bridge increments it after the callback: this is step 5
    manager.fire("on_train_step_end", context)
    assert tensorboard.written == [("moe_relu_sparsity", 0.8, 5),
                                   ("moe_relu_l1_reg_coeff", 2e-8, 5)]


@needs_megatron_training
def test_bridge_recipe_swaps_in_a_remoe_model_config():
    from megatron.remoe.integration import remoe_layer_spec

    example = load_example(BRIDGE, "remoe_recipe_example")
    model_config = example.remoe_model_config(
        vocab_size=512, seq_length=32, num_layers=2, hidden_size=64, num_attention_heads=4,
        ffn_hidden_size=128, num_moe_experts=4, moe_router_topk=1,
        moe_token_dispatcher_type="alltoall", use_cpu_initialization=True)
    base = SimpleNamespace(model="the recipe's model", optimizer="kept", dataset="kept")
    config = example.remoe_pretrain_config(base, model_config)
    assert config is base and config.model is model_config and config.optimizer == "kept"
    assert model_config.transformer.moe_relu_routing
    assert model_config.transformer_layer_spec is remoe_layer_spec
    # a recipe changes a field after construction; Bridge then calls finalize(), which re-applies
    # the ReLU fix-ups: the alltoall capacity factor E/k follows the new k
    assert model_config.transformer.moe_expert_capacity_factor == 4.0
    model_config.transformer.moe_router_topk = 2
    model_config.finalize()
    assert model_config.transformer.moe_expert_capacity_factor == 2.0
