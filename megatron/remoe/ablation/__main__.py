"""`python -m megatron.remoe.ablation GRID.yaml` (= `remoe ablate`)."""

import sys

from megatron.remoe.ablation.cli import main

if __name__ == "__main__":
    sys.exit(main())
