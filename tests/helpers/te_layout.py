"""TEST ONLY: megatron-core's Transformer Engine layer layout, emulated on CPU (TE is not installed
on the CI machines, and its kernels need CUDA).

What differs between megatron-core's TE and local GPT layer specs in a checkpoint is the MoE
layer's pre-MLP norm: the local spec maps `pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_` for
every layer; the TE spec keeps a standalone `TENorm` in MoE layers (key `pre_mlp_layernorm.weight`)
whose TE `_extra_state` is saved too (TE writes an empty uint8 tensor for a norm: it has no
quantizers). Everything else already matches (TE's fused norm+linear keys are what the local spec
maps its norms to; TEGroupedMLP saves like SequentialMLP). The emulated TE spec is the local spec
with that map entry removed from the MoE layers and a norm carrying such an `_extra_state`,
numerically the local model (so runs can be compared bit for bit).

`install(mode)` makes `get_block_spec(..., use_transformer_engine=True)` (and the trainer's
--transformer-impl transformer_engine) build it in this process:
* "te": megatron-core's TE spec as the project's `get_block_spec` treats it (whatever it does);
* "te_before_fix": the same without the project's TE MoE key alignment, i.e. the layout every
  TE run of this project wrote before it existed.

`python -m tests.helpers.te_layout MODE TRAINER_ARGS...` runs the trainer with it installed.
"""

from __future__ import annotations

import copy
import sys

import torch

MODES = ("te", "te_before_fix")


def emulated_te_norm():
    """A norm class with TE's norm state: the project's RMSNorm plus TE's (empty) `_extra_state`."""
    from megatron.remoe.spec import RMSNorm

    class EmulatedTENorm(RMSNorm):
        def get_extra_state(self):
            return torch.empty(0, dtype=torch.uint8)  # TE's extra state of a norm (no quantizers)

        def set_extra_state(self, state):
            assert state is None or state.numel() == 0, state  # as TE: nothing to restore

    return EmulatedTENorm


def emulated_te_block_spec(config, use_transformer_engine=True, **kwargs):
    """megatron-core's decoder block spec, TE layout (see the module docstring)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.remoe.compat import call_with_supported_kwargs, moe_submodules
    from megatron.remoe.cpu.experts import cpu_experts_spec
    from megatron.remoe.spec import RMSNorm

    block = copy.deepcopy(call_with_supported_kwargs(
        get_gpt_decoder_block_spec, config, use_transformer_engine=False, **kwargs))
    te_norm = emulated_te_norm()
    block.layer_norm = RMSNorm
    for layer_spec in block.layer_specs:
        sub = layer_spec.submodules
        sub.input_layernorm = RMSNorm  # saved as TE's fused linear_qkv.layer_norm_weight (map)
        sub.pre_mlp_layernorm = RMSNorm  # dense layers: saved as TE's linear_fc1.layer_norm_weight
        moe = moe_submodules(sub.mlp)
        if moe is not None:
            sub.pre_mlp_layernorm = te_norm
            sub.sharded_state_dict_keys_map = {
                k: v for k, v in sub.sharded_state_dict_keys_map.items()
                if k != "pre_mlp_layernorm."}
            moe.experts = cpu_experts_spec(moe.experts, config)  # the local run's experts
    return block


def install(mode: str, patch=None) -> None:
    """Emulate TE in this process. `patch(obj, name, value)` sets attributes (default setattr;
    tests pass pytest's monkeypatch.setattr so the change is undone)."""
    from megatron.remoe import spec

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")

    def default_patch(obj, name, value):
        setattr(obj, name, value)

    patch = patch or default_patch
    patch(spec, "have_transformer_engine", lambda: True)
    patch(spec, "get_gpt_decoder_block_spec", emulated_te_block_spec)
    if mode == "te_before_fix":
        patch(spec, "align_moe_layer_checkpoint_keys", lambda sub: None)


def main(argv: list) -> int:
    install(argv[0])
    from megatron.remoe.pretrain import main as pretrain_main

    return pretrain_main(argv[1:])


if __name__ == "__main__":  # checkpoint saving spawns processes: keep this guard
    sys.exit(main(sys.argv[1:]))
