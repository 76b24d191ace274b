"""Pretrain a ReMoE GPT with Megatron-LM's own trainer (`megatron.training.pretrain`).

Megatron-LM's `pretrain_gpt.py` cannot take ReMoE's flags (its extra-args hook is fixed) and, up to
megatron-core 0.18, its `--spec` takes an object, not a config-dependent function. This script is
`pretrain_gpt.py` with three changes: the ReMoE flags (`--moe-relu-*`), the model config built as a
`ReMoETransformerConfig` with ReMoE's layer spec, and `attach(model, optimizer)` once the trainer
has built them (lambda then moves once per applied optimizer step and travels in the model's
dist-checkpoint). Run it from a Megatron-LM checkout of the release that matches your
megatron-core (it reuses `pretrain_gpt.py`'s data and forward step), with megatron-remoe installed:

    cd Megatron-LM
    torchrun --nproc-per-node 8 /path/to/megatron-remoe/examples/megatron_lm/pretrain_remoe.py \\
        <pretrain_gpt.py's flags: --num-layers ... --num-experts 8 --moe-router-topk 1 ...> \\
        --moe-relu-routing --moe-token-dispatcher-type alltoall

Both `pretrain()` signatures are handled: megatron-core 0.16-0.18 (`pretrain(datasets_provider,
model_provider, model_type, forward_step, extra_args_provider=...)`, the model built by
`remoe_gpt_builder` below) and 0.19+ (`pretrain(config_container, datasets_provider, model_type,
forward_step)`, a GPTModelConfig whose `transformer_layer_spec` is `remoe_layer_spec`).
What is tested where: docs/integrations.md.
"""

import argparse
import functools
import os
import sys
import typing

from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.training import get_args, print_rank_0, training
from megatron.training.arguments import core_transformer_config_from_args

from megatron.remoe.compat import mcore_at_least
from megatron.remoe.config import ReMoETransformerConfig
from megatron.remoe.integration import attach, remoe_layer_spec
from megatron.remoe.training.config import FIELDS, TrainConfig

# ReMoETransformerConfig fields set from flags of the same name (core_transformer_config_from_args
# copies every dataclass field that has an argument of that name); help and defaults: TrainConfig's
REMOE_FLAGS = ("moe_relu_l1_reg_coeff_init", "moe_relu_l1_reg_coeff_multiplier",
               "moe_relu_l1_reg_coeff_controller", "moe_relu_l1_reg_coeff_ema_beta",
               "moe_relu_l1_reg_coeff_deadband_z", "moe_relu_l1_reg_coeff_pi_kp",
               "moe_relu_l1_reg_coeff_pi_ki", "moe_relu_target_sparsity",
               "moe_relu_warmup_max_experts", "moe_granularity")


def add_remoe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's `extra_args_provider`: the ReMoE flags."""
    group = parser.add_argument_group("ReMoE")
    group.add_argument("--moe-relu-routing", action="store_true",
                       help="route with ReLU (ReMoE) instead of TopK + softmax")
    group.add_argument("--moe-relu-no-load-balancing", dest="moe_relu_load_balancing",
                       action="store_false", help=FIELDS["moe_relu_no_load_balancing"].metadata["help"])
    hints = typing.get_type_hints(TrainConfig)
    for name in REMOE_FLAGS:
        field = FIELDS[name]
        kind = ([a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]])[0]
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default,
                           choices=field.metadata["argparse"].get("choices"),
                           help=field.metadata["help"])
    return parser


@functools.lru_cache(maxsize=None)
def remoe_config() -> ReMoETransformerConfig:
    """The run's ReMoE transformer config: one object for every model chunk, so that all of them
    share one lambda controller (megatron.remoe.integration.controller_for)."""
    return core_transformer_config_from_args(get_args(), config_class=ReMoETransformerConfig)


def remoe_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None,
                      pg_collection=None):
    """megatron-core 0.16-0.18: Megatron-LM's gpt_builder with ReMoE's config and block spec."""
    config = remoe_config()
    extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
    return GPTModel(config=config, transformer_layer_spec=remoe_layer_spec(config, vp_stage),
                    vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
                    parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type,
                    rotary_percent=args.rotary_percent, rotary_base=args.rotary_base,
                    rope_scaling=args.use_rope_scaling, vp_stage=vp_stage, **extra)


def remoe_model_config(args):
    """megatron-core 0.19+: a GPTModelConfig holding the ReMoE config and the spec function."""
    from megatron.training.argument_utils import gpt_config_from_args  # noqa: PLC0415 -- megatron-core 0.19+ only (Megatron-LM argument_utils)

    model_config = gpt_config_from_args(args, config=remoe_config())
    model_config.transformer_layer_spec = remoe_layer_spec  # called with (model_config, vp_stage)
    return model_config


def attach_after_setup() -> None:
    """`attach(model, optimizer)` as soon as the trainer has built them (and loaded a checkpoint):
    Megatron-LM has no callback, so wrap the one function `pretrain()` calls for that."""
    setup = training.setup_model_and_optimizer

    @functools.wraps(setup)
    def setup_then_attach(*args, **kwargs):
        model, optimizer, scheduler = setup(*args, **kwargs)
        controller = attach(model, optimizer)
        if controller is not None:
            print_rank_0(f"ReMoE: lambda {float(controller.l1_coeff):.3e}, target sparsity "
                         f"{remoe_config().target_sparsity:.3f}; moves after each applied step")
        return model, optimizer, scheduler

    training.setup_model_and_optimizer = setup_then_attach


def main() -> None:
    sys.path.insert(0, os.getcwd())  # the Megatron-LM checkout: pretrain_gpt.py, model_provider.py
    import pretrain_gpt  # noqa: PLC0415  (Megatron-LM's, not in the megatron-core wheel)

    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    attach_after_setup()
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    if mcore_at_least(0, 19):  # pretrain(config_container, datasets_provider, model_type, ...)
        from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: PLC0415 -- megatron-core 0.19+ only
        from megatron.training.arguments import parse_and_validate_args  # noqa: PLC0415 -- megatron-core 0.19+ only

        args = parse_and_validate_args(extra_args_provider=add_remoe_args, args_defaults=defaults)
        full_config = pretrain_cfg_container_from_args(args, remoe_model_config(args))
        training.pretrain(full_config, pretrain_gpt.train_valid_test_datasets_provider,
                          ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
    else:  # pretrain(datasets_provider, model_provider, model_type, forward_step, ...)
        from model_provider import model_provider  # noqa: PLC0415  (Megatron-LM's, as above)

        training.pretrain(pretrain_gpt.train_valid_test_datasets_provider,
                          functools.partial(model_provider, remoe_gpt_builder),
                          ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
                          extra_args_provider=add_remoe_args, args_defaults=defaults)


if __name__ == "__main__":
    main()
