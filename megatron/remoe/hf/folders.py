"""HF model folders: written atomically (a temporary sibling directory renamed at the end, so an
error never leaves a partial folder) with the remote-code files, tokenizer files and provenance;
read back through from_pretrained. transformers (optional, the `eval` extra) is imported by
`load_hf_folder` only."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Optional

import torch

from megatron.remoe.hf.configs import hf_kind
from megatron.remoe.hf.errors import ConversionError

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_remoe.py", "modeling_remoe.py")
CONVERSION_META = "remoe_conversion.json"
TRAIN_CONFIG_FILE = "remoe_train_config.json"


def write_tokenizer_files(tokenizer, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) so that
    AutoTokenizer.from_pretrained(out_dir) loads a PreTrainedTokenizerFast."""
    tokenizer.backend.save(os.path.join(out_dir, "tokenizer.json"))
    eod = tokenizer.eod_token
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
           "bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": eod,
           "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({k: eod for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, fh,
                  indent=2)


def check_output_dir(out_dir: str, overwrite: bool) -> str:
    """Fail early (before any work) on an output path we must not or cannot write."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConversionError(f"output {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ConversionError(f"output {out_dir} exists and is not empty; choose a new path "
                                  "or pass --overwrite")
    parent = os.path.dirname(out_dir)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConversionError(f"cannot write into {parent}")
    return out_dir


def _atomic_dir(out_dir: str, overwrite: bool):
    out_dir = check_output_dir(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # no leading dot / extra dots: transformers derives the remote-code module name from it
    stem = "".join(c if c.isalnum() else "_" for c in os.path.basename(out_dir))
    return out_dir, tempfile.mkdtemp(prefix=f"{stem}_tmp_", dir=parent)


def _finish_atomic(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        old = out_dir + ".old" + str(os.getpid())
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_hf_folder(hf_model, out_dir: str, tokenizer=None, meta: Optional[dict] = None,
                   train_config: Optional[dict] = None, overwrite: bool = False,
                   check: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """Write the HF model folder atomically (a temporary sibling directory, renamed at the end):
    config.json, model.safetensors, generation_config.json, the remote-code files for ReMoE,
    tokenizer files, remoe_conversion.json (provenance) and the training config if given.
    `check(tmp_dir)` runs on the complete temporary folder before the rename; if it returns False
    the folder is deleted, nothing is written and None is returned."""
    out_dir, tmp = _atomic_dir(out_dir, overwrite)
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if getattr(hf_model.config, "model_type", "") == "remoe":
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(HERE, name), os.path.join(tmp, name))
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, hf_model.config.max_position_embeddings)
        if meta is not None:
            with open(os.path.join(tmp, CONVERSION_META), "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=2, sort_keys=True, default=str)
        if train_config is not None:
            with open(os.path.join(tmp, TRAIN_CONFIG_FILE), "w", encoding="utf-8") as fh:
                json.dump(train_config, fh, indent=2, sort_keys=True, default=str)
        if check is not None and not check(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        _finish_atomic(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_hf_folder(hf_dir: str, dtype: torch.dtype = torch.float32):
    """(model, kind) from an exported folder (ReMoE folders through trust_remote_code)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 -- optional extra (eval)

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
        kind = hf_kind(config)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                     dtype=dtype)
    except ConversionError:
        raise
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                     torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"cannot load {hf_dir}: {' '.join(str(e).split())[:300]}") from None
    model.eval()
    return model, kind

