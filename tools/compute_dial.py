#!/usr/bin/env python
"""Inference-time compute dial of a ReLU-routed (ReMoE) model: calibrate gate thresholds to a
target number of active experts per token, or sweep quality vs compute against TopK.

    python tools/compute_dial.py --load runs/demo/relu/checkpoints \
        --target-experts-per-token 0.75 --demo-corpus runs/demo/data --out DIR
    python tools/compute_dial.py --load runs/demo/relu/checkpoints --sweep \
        --demo-corpus runs/demo/data --out DIR       # TopK from runs/demo/topk/checkpoints

Same as `remoe dial`; see megatron/remoe/dial_calibration/ and docs/compute-dial.md.
Exit codes: 0 success, 2 bad input (one-line error, nothing written).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if __name__ == "__main__":  # checkpoint loading may spawn processes: keep this guard
    from megatron.remoe.logs import configure

    configure()  # the console, before megatron-core (imported by the next line) warns at import
    from megatron.remoe.dial_calibration import main

    sys.exit(main(prog="compute_dial.py"))
