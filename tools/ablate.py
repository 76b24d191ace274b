#!/usr/bin/env python
"""Ablation grids: TopK vs ReLU routing (and dense) from one YAML file.

    python tools/ablate.py examples/remoe/ablations/cpu-small.yaml            # train + collect
    python tools/ablate.py GRID.yaml --list                                   # the expanded runs
    python tools/ablate.py GRID.yaml --print --launcher 'sbatch scripts/train_slurm.sbatch {config}'
    python tools/ablate.py GRID.yaml --collect                                # tables + plots only

Finished runs (summary.json at train_iters) are skipped, so rerunning the same command continues an
interrupted grid. Outputs: <out>/<run>/ (config, log, metrics, summary), <out>/results.csv,
summary.csv, results.md, results.json and <out>/plots/*.png. See docs/results.md.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # the console and the warning filter are the entry point's, never an import's
    from megatron.remoe.logs import configure

    configure()
    # megatron-core's "Apex/TE not installed", warned while the next line imports it
    warnings.filterwarnings("ignore", category=UserWarning)
    from megatron.remoe.ablation import main

    sys.exit(main(prog="tools/ablate.py"))
