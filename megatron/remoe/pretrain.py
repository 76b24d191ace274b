"""`python -m megatron.remoe.pretrain [flags] [--config FILE.yaml]` (also `remoe train`).

Runs the same on one CPU process, under `torchrun --nproc-per-node N` on CPU (gloo) and on GPUs
(NCCL). Configuration errors are reported as one line on stderr with exit code 2, before any
checkpoint directory or log file is created. The exit codes (2 bad input, 3 non-finite, 4 save
failed, 5 a collective failed: a dead or hanging rank) are defined in megatron/remoe/errors.py.
Exit code 0 also after SIGTERM/SIGUSR1 or --exit-duration-in-mins (a checkpoint was saved).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from megatron.remoe.errors import (
    EXIT_BAD_INPUT,
    EXIT_COLLECTIVE_FAILED,
    EXIT_NONFINITE,
    EXIT_SAVE_FAILED,
    ConfigError,
)
from megatron.remoe.logs import configure


def main(argv: Optional[list] = None, prog: str = "python -m megatron.remoe.pretrain") -> int:
    configure()  # the console: progress lines, known noise filtered (before megatron-core loads)
    # after configure(), which filters the warnings megatron-core gives at import
    from megatron.remoe.training.arguments import parse_config  # noqa: PLC0415 -- after configure()

    quiet = int(os.environ.get("RANK", "0")) != 0  # one error line per job, not per rank
    try:
        cfg = parse_config(argv, prog=prog)
    except ConfigError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    # the training stack (the GPT model, optimizers, checkpointing) once the flags parsed: a bad
    # flag is reported without loading it
    from megatron.remoe.training.checkpointing import CheckpointSaveError  # noqa: PLC0415 -- flags first
    from megatron.remoe.training.distributed import (  # noqa: PLC0415 -- flags first
        CollectiveFailure,
        destroy_distributed,
    )
    from megatron.remoe.training.loop import pretrain  # noqa: PLC0415 -- flags first
    from megatron.remoe.training.nonfinite import NonFiniteError  # noqa: PLC0415 -- flags first

    try:
        pretrain(cfg)
    except ConfigError as e:  # found while opening data/tokenizer/checkpoint: nothing written
        if not quiet:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:  # --nan-policy: stopped without saving
        if not quiet:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except CheckpointSaveError as e:  # every rank raised it together; the message is the same
        if not quiet:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_SAVE_FAILED
    except CollectiveFailure as e:  # any rank may be the survivor: each one says it
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(EXIT_COLLECTIVE_FAILED)  # tearing down process groups with a dead peer can hang
    finally:
        destroy_distributed()
    return 0  # also after a preemption signal or --exit-duration-in-mins (checkpoint saved)


if __name__ == "__main__":  # checkpoint saving spawns processes: keep this guard
    sys.exit(main())
