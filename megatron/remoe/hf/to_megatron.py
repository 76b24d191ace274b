"""HF -> Megatron: an HF model as an in-memory megatron model, and an HF folder as a trainer
checkpoint for continued training (`save_megatron_checkpoint_from_hf`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from megatron.remoe.controller import SparsityController
from megatron.remoe.hf.configs import (
    hf_kind,
    rope_theta,
    transformer_config_fields_from_hf,
    transformer_config_from_hf,
)
from megatron.remoe.hf.errors import ConversionError
from megatron.remoe.hf.folders import (
    CONVERSION_META,
    TRAIN_CONFIG_FILE,
    check_output_dir,
    load_hf_folder,
)
from megatron.remoe.hf.key_map import bare_megatron, hf_to_megatron_state_dict, load_into
from megatron.remoe.logs import get_logger
from megatron.remoe.model import build_controller
from megatron.remoe.training.arguments import coerce_field_value, config_to_yaml, load_yaml_config
from megatron.remoe.training.checkpointing import save_checkpoint
from megatron.remoe.training.checkpointing.offline import build_single_process_model
from megatron.remoe.training.config import FIELDS, TrainConfig, transformer_config
from megatron.remoe.training.state import build_model, build_optimizer
from megatron.remoe.training.validation import finalize_config

logger = get_logger("megatron.remoe.hf")  # the converter's progress lines


def hf_to_megatron(hf_model, tcfg=None, rotary_base: Optional[float] = None):
    """A megatron GPTModel (single process) holding the weights of `hf_model`.
    Returns (model, tcfg)."""
    kind = hf_kind(hf_model.config)
    tcfg = tcfg or transformer_config_from_hf(hf_model.config)
    model = build_single_process_model(tcfg, hf_model.config.vocab_size,
                                       hf_model.config.max_position_embeddings,
                                       rotary_base or rope_theta(hf_model.config))
    hsd = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    load_into(model, hf_to_megatron_state_dict(hsd, tcfg, kind), "megatron model")
    model.eval()
    return model, tcfg


def refuse_dial(hf_dir: str, dial) -> None:
    if dial is not None:
        raise ConversionError(
            f"{hf_dir}/config.json sets router_dial (an inference-time compute dial); training "
            "a dialled model is not supported: remove router_dial from config.json first")


def _model_values(fields: dict, hf_config) -> dict:
    """The TrainConfig model fields describing `hf_config` (transformer_config_fields_from_hf's
    `fields`), in the trainer's terms (experts and top-k before fine-grained splitting)."""
    router = fields["router"]
    G = getattr(hf_config, "moe_granularity", 1) or 1
    theta = rope_theta(hf_config)
    values = dict(
        num_layers=fields["num_layers"], hidden_size=fields["hidden_size"],
        num_attention_heads=fields["num_attention_heads"],
        num_query_groups=fields["num_query_groups"], kv_channels=fields["kv_channels"],
        ffn_hidden_size=fields["ffn_hidden_size"],
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        router=router, moe_granularity=G)
    if router == "dense":
        return values
    E, k = fields["num_experts"], fields["moe_router_topk"]
    if E % G or k % G:
        raise ConversionError(f"experts {E} / top-k {k} not divisible by granularity {G}")
    if fields.get("moe_ffn_hidden_size", fields["ffn_hidden_size"]) * G != fields["ffn_hidden_size"]:
        raise ConversionError(
            f"expert width {fields.get('moe_ffn_hidden_size')} x granularity {G} != dense "
            f"width {fields['ffn_hidden_size']}: the trainer cannot express this model")
    values.update(num_experts=E // G, moe_router_topk=k // G,
                  moe_layer_freq=fields.get("moe_layer_freq", 1))
    if "moe_relu_target_sparsity" in fields:
        values["moe_relu_target_sparsity"] = fields["moe_relu_target_sparsity"]
    return values


def _recorded_values(hf_dir: str, config_yaml: Optional[str]) -> dict:
    """The planned (--config) or the exported run's training config, {} if neither."""
    stored = os.path.join(hf_dir, TRAIN_CONFIG_FILE)
    if config_yaml:
        return load_yaml_config(config_yaml)
    if os.path.isfile(stored):
        with open(stored, encoding="utf-8") as fh:
            return {k: v for k, v in json.load(fh).items() if k in FIELDS}
    return {}


def train_config_from_hf(hf_dir: str, hf_config, config_yaml: Optional[str] = None):
    """The TrainConfig recorded in a checkpoint made from an HF folder.

    `config_yaml` (the planned continued-training config) wins; else the training config the
    exporter stored in the folder; else one derived from the HF config (seq_length =
    max_position_embeddings, tokenizer = the folder itself when it has tokenizer.json). The model
    fields must describe `hf_config` exactly."""
    fields = transformer_config_fields_from_hf(hf_config)
    refuse_dial(hf_dir, fields.get("moe_relu_dial"))
    if fields["router"] == "topk" and fields.get("moe_router_pre_softmax") is False:
        raise ConversionError(
            "this model routes post-softmax (Mixtral semantics); the trainer's topk preset is "
            "pre-softmax, so continued training would change the routing. Use "
            "megatron.remoe.hf.to_megatron.hf_to_megatron() with your own TransformerConfig instead")
    values = _recorded_values(hf_dir, config_yaml)
    model_values = _model_values(fields, hf_config)
    for key, value in model_values.items():
        if config_yaml and key in values and coerce_field_value(key, values[key]) != value and \
                key not in ("rotary_base",):
            raise ConversionError(f"--config {config_yaml}: {key}={values[key]!r} but the HF model "
                                  f"has {key}={value!r}; fix the config")
    values.update(model_values)
    values.setdefault("seq_length", hf_config.max_position_embeddings)
    values.setdefault("train_iters", 1)
    if not values.get("tokenizer") and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        values["tokenizer"] = os.path.abspath(hf_dir)
    values = {k: coerce_field_value(k, v) for k, v in values.items() if k in FIELDS}
    # parallel layout of the saved checkpoint: one process (re-sharded on load)
    values.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                  virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
                  expert_tensor_parallel_size=None, context_parallel_size=1,
                  sequence_parallel=False, bf16=False, transformer_impl="local",
                  moe_grouped_gemm=False, data_path=[], valid_data_path=[], mock_data=True,
                  vocab_size=hf_config.vocab_size, make_vocab_size_divisible_by=1,
                  load=None, save=None, metrics_file=None, use_distributed_optimizer=False)
    return TrainConfig(**values)


def _refuse_dialled_folder(hf_dir: str) -> None:
    """Refuse a dialled folder before loading its weights."""
    try:
        with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        saved = {}  # load_hf_folder reports an unreadable folder
    refuse_dial(hf_dir, saved.get("router_dial") if isinstance(saved, dict) else None)


def _exported_controller(hf_dir: str, controller) -> None:
    """Continue where the exported run stopped: lambda, its step count, target reached (from
    the folder's conversion metadata; lambda_0 without it)."""
    meta_path = os.path.join(hf_dir, CONVERSION_META)
    if controller is None or not os.path.isfile(meta_path):
        return
    with open(meta_path, encoding="utf-8") as fh:
        saved = json.load(fh).get(SparsityController.CHECKPOINT_KEY) or {}
    if SparsityController.saved_l1_coeff(saved):
        controller.load_state_dict(saved)


def _save_atomically(save_dir: str, cfg, model, optimizer, scheduler) -> None:
    """save_checkpoint's final iter_* rename + tracker write is atomic; build next to the target
    and move it in, so a failure leaves nothing at save_dir."""
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_dir)}.tmp", dir=parent)
    try:
        save_checkpoint(tmp, 0, model, optimizer, scheduler, 0, cfg,
                        config_to_yaml(cfg))
        if os.path.exists(save_dir):
            shutil.rmtree(save_dir)
        os.replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_megatron_checkpoint_from_hf(hf_dir: str, save_dir: str, config_yaml: Optional[str] = None,
                                     overwrite: bool = False) -> str:
    """HF folder -> trainer checkpoint `save_dir/iter_0000000` (+ tracker) for continued training.

    The checkpoint holds the weights, the LR-schedule state of the recorded training config at
    step 0 and, for ReLU routing, the sparsity controller of the exported run (lambda, steps,
    target reached; from remoe_conversion.json, else lambda_0), but no optimizer state (an HF
    folder has none): resume it with `remoe train --load SAVE_DIR --no-load-optim ...`.
    Needs init_distributed(ParallelConfig()) first (one process)."""
    save_dir = check_output_dir(save_dir, overwrite)
    _refuse_dialled_folder(hf_dir)
    hf, kind = load_hf_folder(hf_dir, torch.float32)
    cfg = train_config_from_hf(hf_dir, hf.config, config_yaml)
    cfg.save = save_dir
    try:
        cfg = finalize_config(cfg, world_size=1, cuda=False)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"invalid training config for this model: {e}") from None
    tcfg = transformer_config(cfg, use_cpu_initialization=True)
    controller = build_controller(tcfg)
    _exported_controller(hf_dir, controller)
    model = build_model(cfg, tcfg, hf.config.vocab_size, controller, torch.device("cpu"))
    hsd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    load_into(bare_megatron(model), hf_to_megatron_state_dict(hsd, tcfg, kind), "megatron model")
    # the trainer's save needs an optimizer; an HF folder has no Adam state to put in it, so
    # the checkpoint is resumed with --no-load-optim (Adam restarts from zero moments)
    optimizer, scheduler = build_optimizer(cfg, model)
    # the model's routers carry the controller's state (lambda) into the checkpoint
    _save_atomically(save_dir, cfg, model, optimizer, scheduler)
    logger.info(f"convert: wrote megatron checkpoint {save_dir}/iter_0000000 ({kind} -> router "
                f"{cfg.router}); resume with `remoe train --load {save_dir} --no-load-optim ...`")
    return save_dir
