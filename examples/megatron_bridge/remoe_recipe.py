"""ReMoE in NVIDIA Megatron-Bridge (0.6.x: Python 3.12, megatron-core 0.19): a recipe and a callback.

    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    config = remoe_pretrain_config(base_recipe(...), remoe_model_config(
        vocab_size=50304, seq_length=1024, num_layers=12, hidden_size=768,
        num_attention_heads=12, ffn_hidden_size=3072, num_moe_experts=8, moe_router_topk=1,
        moe_token_dispatcher_type="alltoall"))
    pretrain(config, forward_step, callbacks=[ReMoECallback()])

`base_recipe` is any of Bridge's GPT recipe functions (they return a ConfigContainer: data,
optimizer, schedule, checkpointing, logging); the recipe keeps all of it and swaps the model for
a megatron-core GPTModelConfig holding a ReMoETransformerConfig and ReMoE's layer spec function.
Bridge runs the config's `finalize()` after its own changes (ConfigContainer.validate), which
re-checks the ReMoE fields. `ReMoECallback` needs no Bridge import: Bridge's CallbackManager
registers a callback's methods by name. At train start it attaches lambda's update to the
optimizer (once per applied step); after each step it writes ReMoE's metrics (sparsity, lambda,
per-layer statistics) to Bridge's TensorBoard / W&B loggers. Lambda travels in the model's own
dist-checkpoint state, so Bridge's checkpoints save and restore it. The HF AutoBridge
registration is not provided. What is tested where: docs/integrations.md.
"""

from megatron.training.models.gpt import GPTModelConfig  # megatron-core >= 0.19 (Bridge 0.6)

from megatron.remoe.config import ReMoETransformerConfig
from megatron.remoe.integration import attach, remoe_layer_spec


def remoe_model_config(*, vocab_size: int, seq_length: int, position_embedding_type: str = "rope",
                       **transformer_fields) -> GPTModelConfig:
    """A GPT with ReLU-routed MoE layers: `transformer_fields` are ReMoETransformerConfig's
    (megatron-core's TransformerConfig fields plus the `moe_relu_*` ones)."""
    transformer = ReMoETransformerConfig(moe_relu_routing=True, **transformer_fields)
    return GPTModelConfig(transformer=transformer, transformer_layer_spec=remoe_layer_spec,
                          vocab_size=vocab_size, seq_length=seq_length,
                          position_embedding_type=position_embedding_type)


def remoe_pretrain_config(base, model_config: GPTModelConfig):
    """A Bridge recipe's ConfigContainer (`base`, changed in place and returned) training
    `model_config` instead of its own model."""
    base.model = model_config
    return base


class ReMoECallback:
    """Bridge training callback (duck-typed: Bridge registers `on_*` methods by name)."""

    def __init__(self):
        self.controller = None

    def on_train_start(self, context) -> None:
        # after Bridge built the model and optimizer and loaded any checkpoint; every rank
        self.controller = attach(context.model, context.optimizer)

    def on_train_step_end(self, context) -> None:
        stats = self.controller.last_stats if self.controller is not None else None
        if stats is None:  # no applied step yet, or a step without a forward (rerun exit)
            return
        step = context.state.train_state.step + 1  # Bridge counts the step after this callback
        metrics = stats.as_dict()
        tensorboard = getattr(context.state, "tensorboard_logger", None)
        if tensorboard is not None:
            for key, value in metrics.items():
                tensorboard.add_scalar(key, value, step)
        wandb = getattr(context.state, "wandb_logger", None)
        if wandb is not None:
            wandb.log(metrics, step=step)
