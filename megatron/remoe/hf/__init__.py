"""Hugging Face export/import of megatron-remoe models and the ReMoE HF modeling code.

* `configuration_remoe.ReMoEConfig`, `modeling_remoe.ReMoEForCausalLM`: plain-PyTorch HF classes
  (copied into exported folders for `trust_remote_code`).
* The converter, one module per concept: `configs` (which HF class, and the configs both ways:
  `export_kind`, `hf_config_from_megatron`, `transformer_config_from_hf`), `key_map` (the
  parameter-name table read in both directions), `to_hf` (`megatron_to_hf`,
  `load_megatron_checkpoint`, `megatron_checkpoint_to_hf`), `to_megatron` (`hf_to_megatron`,
  `save_megatron_checkpoint_from_hf`), `parity` (`verify_parity`: logits, routing, sparsity,
  greedy decoding), `folders` (atomic HF folder writes and reads), `errors` (`ConversionError`).
  The in-memory functions need megatron-core's parallel state with TP=PP=EP=1, e.g.
  ``init_distributed(ParallelConfig())``; the CLI is `tools/convert_checkpoint.py`.

Needs the `eval` extra (`transformers`, `safetensors`); attributes are imported lazily so that
`import megatron.remoe.hf` works without them.
"""

import importlib

_LAZY = {
    "ReMoEConfig": "megatron.remoe.hf.configuration_remoe",
    "ReMoEForCausalLM": "megatron.remoe.hf.modeling_remoe",
    "routing_sparsity": "megatron.remoe.hf.modeling_remoe",
    "ConversionError": "megatron.remoe.hf.errors",
    "megatron_to_hf": "megatron.remoe.hf.to_hf",
    "hf_to_megatron": "megatron.remoe.hf.to_megatron",
    "verify_parity": "megatron.remoe.hf.parity",
    "save_hf_folder": "megatron.remoe.hf.folders",
    "load_hf_folder": "megatron.remoe.hf.folders",
    "load_megatron_checkpoint": "megatron.remoe.hf.to_hf",
    "megatron_checkpoint_to_hf": "megatron.remoe.hf.to_hf",
    "save_megatron_checkpoint_from_hf": "megatron.remoe.hf.to_megatron",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron.remoe.hf' has no attribute {name!r}")
