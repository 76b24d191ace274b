"""Hugging Face export/import of megatron-remoe models and the ReMoE HF modeling code.

* `configuration_remoe.ReMoEConfig`, `modeling_remoe.ReMoEForCausalLM`: plain-PyTorch HF classes
  (copied into exported folders for `trust_remote_code`).
* `convert`: the converter's public names, from its modules: `configs` (which HF class, configs
  both ways), `key_map` (the parameter-name table read in both directions), `to_hf` / `to_megatron`
  (models, checkpoints and folders each way), `parity` (the parity check), `folders` (atomic HF
  folder writes and reads).

Needs the `eval` extra (`transformers`, `safetensors`); attributes are imported lazily so that
`import megatron.remoe.hf` works without them.
"""

_LAZY = {
    "ReMoEConfig": "megatron.remoe.hf.configuration_remoe",
    "ReMoEForCausalLM": "megatron.remoe.hf.modeling_remoe",
    "routing_sparsity": "megatron.remoe.hf.modeling_remoe",
    "ConversionError": "megatron.remoe.hf.convert",
    "megatron_to_hf": "megatron.remoe.hf.convert",
    "hf_to_megatron": "megatron.remoe.hf.convert",
    "verify_parity": "megatron.remoe.hf.convert",
    "save_hf_folder": "megatron.remoe.hf.convert",
    "load_hf_folder": "megatron.remoe.hf.convert",
    "load_megatron_checkpoint": "megatron.remoe.hf.convert",
    "megatron_checkpoint_to_hf": "megatron.remoe.hf.convert",
    "save_megatron_checkpoint_from_hf": "megatron.remoe.hf.convert",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron.remoe.hf' has no attribute {name!r}")
