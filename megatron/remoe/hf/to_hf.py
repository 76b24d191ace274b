"""Megatron -> HF: an in-memory megatron model as an HF model, and a trainer checkpoint as an HF
folder (`megatron_checkpoint_to_hf`, the converter's default direction).

transformers is an optional dependency (the `eval` extra): its model classes are imported where
they are built.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Optional

import torch

from megatron.remoe.controller import SparsityController
from megatron.remoe.hf.configs import export_kind, hf_config_from_megatron
from megatron.remoe.hf.errors import ConversionError
from megatron.remoe.hf.folders import check_output_dir, load_hf_folder, save_hf_folder
from megatron.remoe.hf.key_map import bare_megatron, load_into, megatron_to_hf_state_dict
from megatron.remoe.hf.parity import verify_parity
from megatron.remoe.logs import get_logger
from megatron.remoe.router import saved_controller_state, set_dial
from megatron.remoe.training.checkpointing.offline import CheckpointLoadError, load_offline_model

logger = get_logger("megatron.remoe.hf")  # the converter's progress lines
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_class(kind: str):
    if kind == "llama":
        from transformers import LlamaForCausalLM  # noqa: PLC0415 -- optional extra (eval)
        return LlamaForCausalLM
    if kind == "mixtral":
        from transformers import MixtralForCausalLM  # noqa: PLC0415 -- optional extra (eval)
        return MixtralForCausalLM
    from megatron.remoe.hf.modeling_remoe import ReMoEForCausalLM  # noqa: PLC0415 -- needs transformers, an optional extra (eval)
    return ReMoEForCausalLM


def keep_expert_bias_fp32(hf) -> None:
    """The router's expert bias stays fp32 in any dtype (it selects experts only)."""
    for mod in hf.modules():
        if getattr(mod, "expert_bias", None) is not None:
            mod.expert_bias.data = mod.expert_bias.data.float()


def megatron_to_hf(model, tcfg, vocab_size: int, max_position_embeddings: int,
                   rotary_base: float = 1_000_000, kind: Optional[str] = None,
                   dtype: torch.dtype = torch.float32, eos_token_id: Optional[int] = None,
                   target_sparsity: Optional[float] = None):
    """An HF model (Llama / Mixtral / ReMoE) holding the weights of megatron `model` (TP=PP=EP=1)."""
    kind = kind or export_kind(tcfg)
    model = bare_megatron(model)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    hf_config = hf_config_from_megatron(tcfg, vocab_size, max_position_embeddings, rotary_base,
                                        kind, eos_token_id, name, target_sparsity)
    hf = hf_class(kind)(hf_config)
    hf_sd = megatron_to_hf_state_dict(
        {k: v.detach().float().cpu() for k, v in model.state_dict().items()
         if isinstance(v, torch.Tensor)}, tcfg, kind, hf.state_dict().keys())
    load_into(hf, hf_sd, "HF model")
    hf = hf.to(dtype)
    if kind == "remoe":
        keep_expert_bias_fp32(hf)
    hf.eval()
    return hf, kind


def cast(hf, dtype):
    """A copy of `hf` in `dtype` (expert bias kept fp32)."""
    hf = copy.deepcopy(hf).to(dtype)
    keep_expert_bias_fp32(hf)
    return hf


def load_megatron_checkpoint(load: str, iteration: Optional[int] = None,
                             tokenizer: Optional[str] = None,
                             overrides: Optional[dict] = None, dial=None):
    """The offline loader (training.checkpointing.offline) for conversion: the checkpoint's model
    in this single process (TP=PP=EP=1, fp32, eval), any saved layout. Needs init_distributed() first.
    `overrides`: TrainConfig fields that do not change the weights' shapes (e.g. the TopK
    `moe_router_topk` or the token dispatcher, for inference); `dial`: a compute dial (see
    megatron.remoe.router.set_dial) applied to the loaded model.
    Returns (model, tcfg, TrainConfig, info) where info has the iteration, lambda, tokenizer,
    padded vocabulary size."""
    try:
        ckpt = load_offline_model(load, iteration, tokenizer, overrides)
    except CheckpointLoadError as e:
        raise ConversionError(str(e)) from None
    if dial is not None:
        set_dial(ckpt.model, dial)
    cfg, common = ckpt.cfg, ckpt.common
    # lambda as the checkpoint's ReLU routers loaded it (their `_extra_state`)
    controller = SparsityController.plain_state(saved_controller_state(ckpt.model))
    info = {"checkpoint": os.path.abspath(ckpt.path), "iteration": ckpt.iteration,
            "consumed_train_samples": common.get("consumed_train_samples"),
            "saved_layout": ckpt.saved_layout, "router": cfg.router,
            "l1_reg_coeff": SparsityController.saved_l1_coeff(controller),
            # remoe_conversion.json keeps it under the same key (to_megatron reads it back)
            SparsityController.CHECKPOINT_KEY: controller or None,
            "vocab_size": ckpt.vocab_size, "tokenizer": ckpt.tokenizer,
            "tokenizer_name": tokenizer or cfg.tokenizer}
    logger.info(f"convert: loaded {ckpt.path} ({cfg.router}, {cfg.num_layers} layers, iteration "
                f"{ckpt.iteration}, saved layout {ckpt.layout_text()}) in {ckpt.seconds:.1f} s")
    return ckpt.model, ckpt.tcfg, cfg, info


def _parity_prompt(tok) -> Optional[torch.Tensor]:
    """A short real prompt for the greedy-decoding check (None: verify_parity picks one)."""
    if tok is None:
        return None
    ids = tok.encode("The meaning of life is")[:8]
    return torch.tensor([ids]) if len(ids) >= 2 else None


def _folder_check(model, hf, hf_fp32, torch_dtype, prompt, tolerance: float,
                  summary: dict) -> Callable[[str], bool]:
    """save_hf_folder's `check`: parity of the folder as written, reloaded through
    from_pretrained (trust_remote_code for ReMoE). fp32 exports are compared with megatron
    directly; bf16 exports must reload bit-identical to the cast weights, and the fp32
    conversion is compared with megatron."""
    def check(tmp_dir: str) -> bool:
        reloaded, _ = load_hf_folder(tmp_dir, torch_dtype)
        if torch_dtype == torch.float32:
            rep = verify_parity(model, reloaded, prompt=prompt, tolerance=tolerance)
        else:
            rep = verify_parity(model, hf_fp32, prompt=prompt, tolerance=tolerance)
            a, b = hf.state_dict(), reloaded.state_dict()
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            if not same:
                rep.ok = False
                rep.failures.append("the written bf16 folder does not reload to the same weights")
        logger.info(rep.summary())
        summary["verify"] = rep.as_dict()
        return rep.ok

    return check


def megatron_checkpoint_to_hf(load: str, out_dir: str, iteration: Optional[int] = None,
                              dtype: str = "fp32", verify: bool = False,
                              tokenizer: Optional[str] = None, overwrite: bool = False,
                              tolerance: float = 1e-4, dial=None) -> dict:
    """Checkpoint -> HF folder (optionally with the parity check, run before anything is written:
    a failing check writes nothing). `dial`: a compute dial (dial.json's content) written into
    config.json as `router_dial`; --verify then compares the two dialled models.
    Returns a summary dict (with the ParityReport if verified)."""
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise ConversionError(f"--dtype {dtype} is not one of fp32, bf16")
    check_output_dir(out_dir, overwrite)
    model, tcfg, cfg, info = load_megatron_checkpoint(load, iteration, tokenizer, dial=dial)
    tok = info["tokenizer"]
    eos = tok.eod if tok is not None else None
    hf, kind = megatron_to_hf(model, tcfg, info["vocab_size"], cfg.seq_length, cfg.rotary_base,
                              eos_token_id=eos)
    logger.info(f"convert: exporting as {type(hf).__name__} ({kind})")
    provenance = {k: v for k, v in info.items() if k != "tokenizer"}
    summary = {"kind": kind, "class": type(hf).__name__, "out": os.path.abspath(out_dir),
               **provenance}
    hf_fp32 = hf
    if torch_dtype != torch.float32:
        hf = cast(hf, torch_dtype)
    check = _folder_check(model, hf, hf_fp32, torch_dtype, _parity_prompt(tok), tolerance,
                          summary)
    meta = {"source": "megatron-remoe", "export_kind": kind, "dtype": dtype, **provenance}
    written = save_hf_folder(hf, out_dir, tok, meta=meta, train_config=cfg.to_dict(),
                             overwrite=overwrite, check=check if verify else None)
    if written:
        logger.info(f"convert: wrote {os.path.abspath(out_dir)}")
    return summary
