"""Calibration of the compute dial and the quality-vs-compute sweep: `remoe dial`.

    remoe dial --load CKPT --target-experts-per-token X [--out DIR] [--method global|per-layer]
               [--form cut|shift] [--max-experts M] [--demo-corpus DIR | --text D=FILE | --data D=PREFIX]
    remoe dial --load CKPT --thresholds T[,T...] [--out DIR]        (evaluate given thresholds)
    remoe dial --load CKPT --sweep [--out DIR] [--topk-load CKPT]

CKPT is a Megatron checkpoint directory (any saved layout; rebuilt in this process by the
converter's loader) or an exported HF folder (converted in memory to the same megatron model).
Held-out tokens: the demo corpus's valid split, text files, tokenized prefixes, or by default the
run's own --valid-data-path. Every number comes from full forward passes of the dialled model
over those tokens (`analysis.capture_routing`): realised experts per token (mean over MoE layers
and tokens), next-token loss overall and per domain.

Calibration (hits the target within `--tolerance`, default 2%, or fails with one line):

* ``global``: one tau for every MoE layer, found by regula falsi (Illinois) on the realised mean,
  one forward pass per step. A layer's dial changes the inputs of the later layers, so the
  realised count is measured, never predicted.
* ``per-layer``: per-layer budgets b_l by measured marginal loss sensitivity, greedily: from the
  undialled model, remove a step of experts/token from the one layer where the measured loss
  increase per removed expert is smallest (one pass per candidate layer), then re-hit every
  budget; repeat down to the target. Budgets become thresholds in layer order: layer l's gates
  depend only on tau_1..tau_{l-1}, so one pass captures them and tau_l is the gate value that
  leaves b_l experts per token (exact up to ties).

Thresholds are >= 0, so a dial can only remove experts: targets above the undialled model's
experts per token are refused. The sweep runs both methods and both forms over
--sweep-multiples x the trained k, and a TopK checkpoint at k' = 1..E; it writes sweep.csv,
compute_dial.png and sweep.json. Exit codes: 0 done, 2 bad input (one line, nothing written).

Modules, in the order a calibration uses them: `inputs` (the model and the held-out tokens),
`measure` (forward passes -> a DialPoint), `calibrate` (global and per-layer thresholds), `sweep`
(quality vs compute, CSV and figure), `command` (the command line: `main`, `run`).
"""

from megatron.remoe.dial_calibration.calibrate import (
    calibrate,
    calibrate_global,
    calibrate_layers,
    check_reached,
    count_at,
    greedy_per_layer,
    threshold_for,
)
from megatron.remoe.dial_calibration.command import (
    DEFAULT_MULTIPLES,
    build_parser,
    default_out,
    main,
    point_dict,
    run,
)
from megatron.remoe.dial_calibration.inputs import (
    DialUsageError,
    LoadedModel,
    eval_tokens_from_texts,
    held_out_tokens,
    is_hf_folder,
    load_model,
)
from megatron.remoe.dial_calibration.measure import DialPoint, Evaluator, forward_flops
from megatron.remoe.dial_calibration.sweep import (
    CSV_FIELDS,
    sweep_figure,
    sweep_relu,
    sweep_topk,
    write_csv,
)

__all__ = [
    "CSV_FIELDS", "DEFAULT_MULTIPLES", "DialPoint", "DialUsageError", "Evaluator", "LoadedModel",
    "build_parser", "calibrate", "calibrate_global", "calibrate_layers", "check_reached", "count_at",
    "default_out", "eval_tokens_from_texts", "forward_flops", "greedy_per_layer",
    "held_out_tokens", "is_hf_folder", "load_model", "main", "point_dict", "run", "sweep_figure",
    "sweep_relu", "sweep_topk", "threshold_for", "write_csv",
]
