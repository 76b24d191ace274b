"""The pretraining driver (what Megatron-LM keeps in `megatron/training/`): TrainConfig and its
flags (`config`, `arguments`, `validation`), the loop (`loop`, `step`, `state`), fault handling
(`nonfinite`, `signals`, `run_lock`, `distributed`, `fault_injection`), data loaders (`data`),
metrics and checkpoints (`metrics`, `checkpointing/`). The entry point is
`python -m megatron.remoe.pretrain` (or `remoe train`)."""
