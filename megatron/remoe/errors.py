"""The package's base error and the trainer's process exit codes: a leaf (stdlib only), so that a
file lock or a checkpoint reader can raise `ConfigError` without importing megatron-core.

Exit codes of `python -m megatron.remoe.pretrain` / `remoe train` (0: done, also after a
preemption signal or --exit-duration-in-mins, with a checkpoint saved):
"""

EXIT_BAD_INPUT = 2  # ConfigError: a bad flag, config, data, tokenizer or checkpoint; nothing written
EXIT_NONFINITE = 3  # NonFiniteError: --nan-policy stop on a non-finite loss or gradient, nothing saved
EXIT_SAVE_FAILED = 4  # CheckpointSaveError: writing a checkpoint failed; the previous one is intact
EXIT_COLLECTIVE_FAILED = 5  # CollectiveFailure: a collective failed or timed out (a dead rank)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""
