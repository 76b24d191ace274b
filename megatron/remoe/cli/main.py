"""The `remoe` console script: `remoe train [flags]` (= python -m megatron.remoe.pretrain) and
`remoe demo [--compare] [--iters N] [--nproc N] [--out DIR]`, `remoe ablate GRID.yaml` and
`remoe dial --load CKPT (--target-experts-per-token X | --thresholds T | --sweep) --out DIR`."""

from __future__ import annotations

import sys
from typing import Optional

from megatron.remoe.logs import configure

USAGE = """usage: remoe <command> [options]

commands:
  train   pretrain a ReMoE / TopK / dense GPT (megatron-style flags or --config FILE.yaml)
  demo    build the demo corpus and train a small ReMoE GPT on CPU, then print a summary
  ablate  run a YAML grid of TopK / ReLU / dense runs, skip finished ones, collect tables/plots
  dial    inference-time compute dial of a ReLU-routed model: calibrate gate thresholds to a
          target number of experts per token, or sweep quality vs compute against TopK

`remoe <command> --help` lists the options of a command."""


def main(argv: Optional[list] = None) -> int:
    configure()  # the console: progress lines, known noise filtered (before megatron-core loads)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from megatron.remoe.pretrain import main as train_main  # noqa: PLC0415 -- dispatch: `remoe --help` and the other subcommands do not load torch/megatron-core

        return train_main(rest, prog="remoe train")
    if command == "demo":
        from megatron.remoe.cli.demo import main as demo_main  # noqa: PLC0415 -- dispatch: `remoe --help` and the other subcommands do not load torch/megatron-core

        return demo_main(rest, prog="remoe demo")
    if command == "ablate":
        from megatron.remoe.ablation import main as ablate_main  # noqa: PLC0415 -- dispatch: `remoe --help` and the other subcommands do not load torch/megatron-core

        return ablate_main(rest, prog="remoe ablate")
    if command == "dial":
        from megatron.remoe.dial_calibration import main as dial_main  # noqa: PLC0415 -- dispatch: `remoe --help` and the other subcommands do not load torch/megatron-core

        return dial_main(rest, prog="remoe dial")
    print(f"error: unknown command {command!r}; use `remoe train`, `remoe demo`, `remoe ablate` or "
          "`remoe dial`",
          file=sys.stderr)
    return 2


if __name__ == "__main__":  # checkpoint saving spawns processes: keep this guard
    sys.exit(main())
