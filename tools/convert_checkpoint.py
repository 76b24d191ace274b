#!/usr/bin/env python
"""Convert megatron-remoe checkpoints to Hugging Face folders and back.

Megatron -> HF (any saved TP/PP/EP layout; the model is rebuilt in this one process):

    python tools/convert_checkpoint.py --load CKPT_DIR [--iteration N] --out HF_DIR \
        [--verify] [--dtype fp32|bf16] [--tokenizer gpt2|DIR] [--overwrite]

    ReLU-routed models become `ReMoEForCausalLM` (trust_remote_code; modeling file inside the
    folder), dense models `LlamaForCausalLM`, TopK models `MixtralForCausalLM` only when their
    routing is Mixtral's (post-softmax top-k), otherwise `ReMoEForCausalLM` with router_type topk.
    --verify runs the parity check (logits within 1e-4, routing maps, per-layer sparsity, greedy
    decoding) in fp32 BEFORE writing; on failure nothing is written and the exit code is 1.
    --dial DIAL_JSON (from `remoe dial`) exports a dialled model: the thresholds go into
    config.json (router_dial) and --verify compares the dialled megatron and HF models.

HF -> Megatron (a trainer checkpoint for continued training, iteration 0, fresh optimizer):

    python tools/convert_checkpoint.py --hf-to-megatron --hf HF_DIR --save CKPT_DIR \
        [--config TRAIN.yaml] [--verify] [--overwrite]

Exit codes: 0 success, 1 parity check failed, 2 bad arguments / unconvertible input (one-line
error on stderr). Output folders are written to a temporary sibling and renamed at the end, so an
error never leaves a partial output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path line; stdlib only)


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Megatron (torch_dist) <-> Hugging Face conversion for megatron-remoe models")
    p.add_argument("--load", help="megatron checkpoint directory (the --save dir of the run, or "
                                  "one iter_XXXXXXX directory)")
    p.add_argument("--iteration", type=int, help="iteration to convert (default: latest)")
    p.add_argument("--out", help="HF output folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the exported weights (verify always runs in fp32)")
    p.add_argument("--tokenizer", help="override the run's tokenizer ('gpt2' or a directory)")
    p.add_argument("--verify", action="store_true",
                   help="parity check megatron vs HF before writing; exit 1 on failure")
    p.add_argument("--dial", metavar="DIAL_JSON",
                   help="write this compute dial (remoe dial's dial.json: thresholds, form, "
                        "max_experts) into config.json as router_dial; --verify then compares "
                        "the dialled models")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |logit diff| accepted by --verify (fp32)")
    p.add_argument("--report", help="also write the conversion summary / parity numbers as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    p.add_argument("--hf-to-megatron", action="store_true",
                   help="convert an HF folder (--hf) into a trainer checkpoint (--save)")
    p.add_argument("--hf", help="HF model folder (with --hf-to-megatron)")
    p.add_argument("--save", help="checkpoint directory to create (with --hf-to-megatron)")
    p.add_argument("--config", help="with --hf-to-megatron: the YAML of the continued-training "
                                    "run (its LR schedule is stored in the checkpoint)")
    return p


def _check_args(args) -> None:
    if args.hf_to_megatron:
        if not args.hf or not args.save:
            raise UsageError("--hf-to-megatron needs --hf HF_DIR and --save CKPT_DIR")
        bad = [f for f in ("load", "out", "iteration", "tokenizer", "dial")
               if getattr(args, f) is not None]
        if bad:
            raise UsageError(f"--{bad[0]} does not apply to --hf-to-megatron")
        if args.dtype != "fp32":
            raise UsageError("--dtype does not apply to --hf-to-megatron (checkpoints are fp32)")
        if not os.path.isfile(os.path.join(args.hf, "config.json")):
            raise UsageError(f"--hf {args.hf} is not a Hugging Face model folder (no config.json)")
        if args.config and not os.path.isfile(args.config):
            raise UsageError(f"--config {args.config} does not exist")
    else:
        if not args.load or not args.out:
            raise UsageError("need --load CKPT_DIR and --out HF_DIR (or --hf-to-megatron --hf "
                             "HF_DIR --save CKPT_DIR)")
        bad = [f for f in ("hf", "save", "config") if getattr(args, f) is not None]
        if bad:
            raise UsageError(f"--{bad[0]} only applies with --hf-to-megatron")
        if not os.path.isdir(args.load):
            raise UsageError(f"--load {args.load}: no such directory")
        if args.iteration is not None and args.iteration < 0:
            raise UsageError("--iteration must be >= 0")
        if args.dial is not None:
            try:
                with open(args.dial, encoding="utf-8") as fh:
                    args.dial_dict = json.load(fh)
            except (OSError, ValueError) as e:
                raise UsageError(f"--dial {args.dial}: cannot read JSON ({e})") from None
            if not isinstance(args.dial_dict, dict) or "thresholds" not in args.dial_dict:
                raise UsageError(f"--dial {args.dial}: no 'thresholds' (write it with "
                                 "`remoe dial`)")
    if not args.tolerance > 0:
        raise UsageError("--tolerance must be > 0")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 -- optional extra (eval)

        hf_logging.set_verbosity_error()
    except ImportError:
        pass

    logging.getLogger("megatron").setLevel(logging.ERROR)


def _hf_to_megatron(args) -> tuple:
    """--hf-to-megatron: the checkpoint, then (with --verify) its parity with the HF folder."""
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    from megatron.remoe.hf.folders import load_hf_folder  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.hf.parity import verify_parity  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.hf.to_hf import load_megatron_checkpoint  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.hf.to_megatron import save_megatron_checkpoint_from_hf  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    save_megatron_checkpoint_from_hf(args.hf, args.save, args.config, overwrite=args.overwrite)
    summary = {"save": os.path.abspath(args.save)}
    if not args.verify:
        return summary, True
    model, _, _, _ = load_megatron_checkpoint(args.save)
    hf, _ = load_hf_folder(args.hf, torch.float32)
    rep = verify_parity(model, hf, tolerance=args.tolerance)
    print(rep.summary(), flush=True)
    summary["verify"] = rep.as_dict()
    return summary, rep.ok


def _megatron_to_hf(args) -> tuple:
    from megatron.remoe.hf.to_hf import megatron_checkpoint_to_hf  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    summary = megatron_checkpoint_to_hf(
        args.load, args.out, iteration=args.iteration, dtype=args.dtype,
        verify=args.verify, tokenizer=args.tokenizer, overwrite=args.overwrite,
        tolerance=args.tolerance, dial=getattr(args, "dial_dict", None))
    ok = summary.get("verify", {}).get("ok", True)
    if not ok:
        print(f"error: parity check failed; nothing written to {args.out}", file=sys.stderr)
    return summary, ok


def _convert(args) -> int:
    """Run the conversion in a one-process megatron-core parallel state."""
    # imported after the argument checks: megatron-core and transformers take seconds to import
    try:
        import transformers  # noqa: F401, PLC0415 -- optional extra (eval)
    except ImportError:
        raise UsageError("transformers is not installed; pip install 'megatron-remoe[eval]'")
    from megatron.remoe.hf.folders import check_output_dir  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.training.distributed import ParallelConfig, destroy_distributed, init_distributed  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    check_output_dir(args.save if args.hf_to_megatron else args.out, args.overwrite)
    os.environ.pop("MASTER_PORT", None) if "WORLD_SIZE" not in os.environ else None
    init_distributed(ParallelConfig(), seed=1234)
    try:
        summary, ok = _hf_to_megatron(args) if args.hf_to_megatron else _megatron_to_hf(args)
    finally:
        destroy_distributed()
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return 0 if ok else 1


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    parser = build_parser()

    def error(message):
        raise UsageError(message)

    parser.error = error
    try:
        args = parser.parse_args(argv)
        _check_args(args)
        _quiet()
        return _convert(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ConversionError and friends: one line, exit 2
        from_module = type(e).__module__
        if type(e).__name__ in ("ConversionError", "ConfigError", "TokenizerError", "DataError") \
                or from_module.startswith("megatron.remoe"):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # checkpoint saving spawns processes: keep this guard
    sys.exit(main())
