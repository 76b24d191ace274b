"""Megatron-Core <-> Hugging Face conversion of megatron-remoe GPT models, plus a parity check.

The public names of the converter, one import away (`from megatron.remoe.hf import convert`);
each lives in the module of its concept:

    configs      export_kind(tcfg) -> "remoe" | "mixtral" | "llama" (which HF class, and why);
                 hf_config_from_megatron(tcfg, vocab_size, ...), transformer_config_from_hf(hf_config)
    key_map      the parameter-name table read in both directions:
                 megatron_to_hf_state_dict(megatron_sd, tcfg, kind, hf_keys),
                 hf_to_megatron_state_dict(hf_sd, tcfg, kind)
    to_hf        megatron_to_hf(model, tcfg, vocab_size, ...) -> HF model (weights copied);
                 load_megatron_checkpoint(path, iteration=None) -> (model, tcfg, TrainConfig, info)
                 (training.checkpointing.offline's loader); megatron_checkpoint_to_hf(load, out_dir, ...)
    to_megatron  hf_to_megatron(hf_model) -> (megatron GPTModel, tcfg);
                 save_megatron_checkpoint_from_hf(hf_dir, save_dir) -> iter_0000000 checkpoint for
                 continued training
    parity       verify_parity(megatron_model, hf_model, ...) -> ParityReport (logits, routing,
                 sparsity, greedy decoding)
    folders      save_hf_folder(hf_model, out_dir, tokenizer, ...) (atomic: tmp dir + rename),
                 load_hf_folder(hf_dir)

The in-memory functions need megatron-core's parallel state with TP=PP=EP=1, e.g.
``init_distributed(ParallelConfig())``. The CLI is `tools/convert_checkpoint.py`.
"""

from megatron.remoe.hf.configs import (
    export_kind,
    hf_config_from_megatron,
    hf_kind,
    transformer_config_fields_from_hf,
    transformer_config_from_hf,
)
from megatron.remoe.hf.errors import ConversionError
from megatron.remoe.hf.folders import (
    CONVERSION_META,
    REMOTE_CODE_FILES,
    TRAIN_CONFIG_FILE,
    check_output_dir,
    load_hf_folder,
    save_hf_folder,
    write_tokenizer_files,
)
from megatron.remoe.hf.key_map import (
    KeyRule,
    conversion_moe_layer_pattern,
    hf_to_megatron_state_dict,
    key_map,
    megatron_to_hf_state_dict,
)
from megatron.remoe.hf.parity import (
    ParityReport,
    greedy_hf,
    greedy_hf_generate,
    greedy_megatron,
    verify_parity,
)
from megatron.remoe.hf.to_hf import (
    load_megatron_checkpoint,
    megatron_checkpoint_to_hf,
    megatron_to_hf,
)
from megatron.remoe.hf.to_megatron import (
    hf_to_megatron,
    save_megatron_checkpoint_from_hf,
    train_config_from_hf,
)

__all__ = [
    "CONVERSION_META", "ConversionError", "KeyRule", "ParityReport", "REMOTE_CODE_FILES",
    "TRAIN_CONFIG_FILE", "check_output_dir", "export_kind", "greedy_hf", "greedy_hf_generate",
    "greedy_megatron", "hf_config_from_megatron", "hf_kind", "hf_to_megatron",
    "hf_to_megatron_state_dict", "key_map", "load_hf_folder", "load_megatron_checkpoint",
    "megatron_checkpoint_to_hf", "megatron_to_hf", "megatron_to_hf_state_dict",
    "conversion_moe_layer_pattern", "save_hf_folder", "save_megatron_checkpoint_from_hf",
    "train_config_from_hf", "transformer_config_fields_from_hf", "transformer_config_from_hf",
    "verify_parity", "write_tokenizer_files",
]
