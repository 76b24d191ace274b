#!/usr/bin/env python
"""Routing analysis of trained MoE checkpoints (ReLU/ReMoE or TopK): a report folder with figures.

Examples:
  # one checkpoint (latest in the directory), the run's own validation data, 20k tokens per domain
  python tools/analyze_routing.py --load runs/demo/relu/checkpoints --out runs/demo/analysis

  # ReMoE and TopK side by side on the same tokens
  python tools/analyze_routing.py --load runs/demo/relu/checkpoints --label ReMoE \\
      --load runs/demo/topk/checkpoints --label TopK --out runs/demo/analysis-vs

  # routing flips between an earlier and the final checkpoint of the same run
  python tools/analyze_routing.py --load runs/demo/relu/checkpoints \\
      --compare-load runs/demo/relu/checkpoints/iter_0000450 --out runs/demo/analysis-flips

  # other data: one DOMAIN=PREFIX per domain; token frequencies from --train-data
  python tools/analyze_routing.py --load CKPT --data web=out/web code=out/code \\
      --train-data out/train_web out/train_code --out report/

Writes DIR/report.md (embeds the PNG figures), the CSV behind every figure and analysis.json.
Missing checkpoints or data, or a non-empty --out without --overwrite: one line on stderr, exit 2.
See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.remoe.logs import configure, get_logger  # noqa: E402  (after the sys.path line; stdlib only)

logger = get_logger("megatron.remoe.analyze_routing")

# megatron-core / torch chatter that says nothing about the analysis (filtered by main, never at import)
NOISE = (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
         ".*full scope is deprecated.*", ".*deprecating ShardedTensor.*",
         ".*`load_state_dict` is deprecated.*")

# megatron-core takes seconds to import: the functions below import megatron.remoe (and with it
# megatron-core) when they run, so that --help and argument errors are instant.

ROUTER_LABELS = {"relu": "ReMoE", "topk": "TopK", "topk-sigmoid-bias": "TopK-sigmoid-bias"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analyze_routing.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--load", action="append", required=True, metavar="CKPT",
                   help="checkpoint directory (--save dir: its latest checkpoint, or one "
                        "iter_XXXXXXX dir); any parallel layout. Repeat to compare models")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="name of the preceding --load in the report (default: router name)")
    p.add_argument("--compare-load", action="append", default=[], metavar="CKPT",
                   help="another checkpoint of the same architecture: routing flip rate against "
                        "the i-th --load (give one per --load, in the same order)")
    p.add_argument("--data", nargs="+", default=None, metavar="DOMAIN=PREFIX",
                   help="evaluation data per domain (Megatron indexed dataset prefixes); default: "
                        "the first checkpoint's --valid-data-path (the demo's per-domain "
                        "validation sets)")
    p.add_argument("--split", choices=["valid", "test"], default="valid",
                   help="without --data: the demo data split to analyse [valid]")
    p.add_argument("--train-data", nargs="+", default=None, metavar="PREFIX",
                   help="where token frequencies are counted; default: the first checkpoint's "
                        "--data-path (training split); 'none': the analysed tokens")
    p.add_argument("--freq-max-tokens", type=int, default=50_000_000,
                   help="count frequencies on at most this many tokens per prefix [50M]")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer ('gpt2' or a directory); default: the checkpoint's")
    p.add_argument("--tokens-per-domain", type=int, default=20_000,
                   help="analysed tokens per domain (first documents in order) [20000]")
    p.add_argument("--seq-length", type=int, default=None,
                   help="sequence length of the analysed windows (default: the models' "
                        "training sequence length, the smallest when they differ)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward [8]")
    p.add_argument("--buckets", type=int, default=12,
                   help="log-spaced token-frequency-rank buckets for the Fig. 7 plot [12]")
    p.add_argument("--top", type=int, default=10, help="tokens listed per expert [10]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-figures", action="store_true",
                   help="CSV + report.md only (no matplotlib needed)")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (files of the same name are replaced)")
    return p


def _labels(args, cfgs: list) -> list:
    labels = list(args.label)
    for cfg in cfgs[len(labels):]:
        labels.append(ROUTER_LABELS.get(cfg.router, cfg.router))
    # unique
    seen: dict = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab}-{n + 1}")
    return out


def _parse_data(items: list) -> dict:
    from megatron.remoe.analysis import AnalysisError  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    data = {}
    for item in items:
        if "=" not in item:
            raise AnalysisError(f"--data {item}: expected DOMAIN=PREFIX")
        name, prefix = item.split("=", 1)
        if not name or not prefix:
            raise AnalysisError(f"--data {item}: expected DOMAIN=PREFIX")
        if name in data:
            raise AnalysisError(f"--data: domain {name} given twice")
        data[name] = prefix
    return data


def _check_args(args) -> None:
    from megatron.remoe.analysis import AnalysisError  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    if len(args.label) > len(args.load):
        raise AnalysisError(f"{len(args.label)} --label for {len(args.load)} --load")
    if args.compare_load and len(args.compare_load) != len(args.load):
        raise AnalysisError(f"give one --compare-load per --load ({len(args.load)}), got "
                            f"{len(args.compare_load)}")
    for name in ("tokens_per_domain", "batch_size", "buckets", "top"):
        if getattr(args, name) < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} must be >= 1")


def _checkpoints(args) -> tuple:
    """(paths, compare paths, their configs, compare configs): cheap, common state only."""
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    from megatron.remoe import analysis as A  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.training.checkpointing import read_checkpoint_config, resolve_checkpoint  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    paths = [resolve_checkpoint(p) for p in args.load]
    cpaths = [resolve_checkpoint(p) for p in args.compare_load]
    if not args.no_figures:
        A.pyplot()  # fail now, not after the forward passes
    A.prepare_out_dir(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [read_checkpoint_config(p)[0] for p in paths]
    ccfgs = [read_checkpoint_config(p)[0] for p in cpaths]
    for p, cfg in zip(paths + cpaths, cfgs + ccfgs):
        if not cfg.moe:
            raise A.AnalysisError(f"checkpoint {p} is a dense model: no routing to analyse")
    return paths, cpaths, cfgs, ccfgs


def _eval_data(args, cfgs: list, tokenizer) -> tuple:
    """({domain: prefix}, [training prefixes], EvalTokens, window length)."""
    from megatron.remoe import analysis as A  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    if args.data:
        data, train = _parse_data(args.data), []
    else:
        data, train = A.default_data(cfgs[0], args.split)
    if args.train_data:
        train = [] if args.train_data == ["none"] else args.train_data
    seq = min(c.seq_length for c in cfgs)
    if args.seq_length:
        if args.seq_length > seq:
            raise A.AnalysisError(f"--seq-length {args.seq_length} exceeds the models' training "
                                f"sequence length {seq}")
        seq = args.seq_length
    eval_tokens = A.make_eval_tokens(data, args.tokens_per_domain, seq, tokenizer)
    logger.info(f"analyze: {len(eval_tokens.token_ids):,} tokens from {len(data)} domains "
                f"({', '.join(f'{d} {n:,}' for d, n in eval_tokens.tokens_per_domain().items())}), "
                f"windows of {seq}")
    return data, train, eval_tokens, seq


def _capture_all(args, paths: list, cpaths: list, labels: list, eval_tokens,
                 tokenizer) -> tuple:
    """Load each checkpoint in turn (one model in memory at a time) and capture its routing;
    with --compare-load also the flip rates against the compared checkpoint.
    Returns (captures, flips, vocabulary size)."""
    from megatron.remoe import analysis as A  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    captures, flips, vocab = [], [], None
    for i, (path, label) in enumerate(zip(paths, labels)):
        model, cfg, info = A.load_checkpoint_model(path, tokenizer)
        vocab = model.vocab_size
        if int(eval_tokens.token_ids.max()) >= vocab:
            raise A.AnalysisError(f"the data holds token ids >= the vocabulary ({vocab}) of "
                                f"{path}; wrong --tokenizer/--data?")
        cap = A.capture_routing(model, eval_tokens, label, args.batch_size)
        cap.info.update(info)
        captures.append(cap)
        del model
        if cpaths:
            other, _, oinfo = A.load_checkpoint_model(cpaths[i], tokenizer)
            olabel = f"{label}@{oinfo.get('iteration')}"
            ocap = A.capture_routing(other, eval_tokens, olabel, args.batch_size)
            flips.append((label + (f"@{info.get('iteration')}" if info.get("iteration")
                                   is not None else ""), olabel, A.flip_rates(cap, ocap)))
            del other
    return captures, flips, vocab


def _frequencies(args, train: list, vocab: int, eval_tokens) -> tuple:
    """(token counts, where they were counted): the training split, else the analysed tokens."""
    from megatron.remoe import analysis as A  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    if not train:
        return (np.bincount(eval_tokens.token_ids, minlength=vocab),
                "the analysed tokens (no training split given)")
    t0 = time.perf_counter()
    freq = A.token_frequencies(train, vocab, args.freq_max_tokens)
    logger.info(f"analyze: token frequencies from {int(freq.sum()):,} training tokens in "
                f"{time.perf_counter() - t0:.1f} s")
    return freq, f"the training split ({len(train)} dataset{'s' if len(train) > 1 else ''})"


def run(args) -> str:
    from megatron.remoe import analysis as A  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    t_start = time.perf_counter()
    _check_args(args)
    paths, cpaths, cfgs, ccfgs = _checkpoints(args)
    labels = _labels(args, cfgs)
    tokenizer = A.load_analysis_tokenizer(cfgs[0], args.tokenizer)
    tok_names = {c.tokenizer for c in cfgs + ccfgs}
    if len(tok_names) > 1 and not args.tokenizer:
        logger.warning(f"analyze: warning: the checkpoints were trained with different tokenizers "
                       f"{sorted(map(str, tok_names))}; using {cfgs[0].tokenizer}")
    data, train, eval_tokens, seq = _eval_data(args, cfgs + ccfgs, tokenizer)
    init_distributed(ParallelConfig(), seed=cfgs[0].seed)
    captures, flips, vocab = _capture_all(args, paths, cpaths, labels, eval_tokens, tokenizer)
    freq, freq_source = _frequencies(args, train, vocab, eval_tokens)
    meta = {"command": " ".join(sys.argv), "data": data, "train_data": train,
            "tokens_per_domain": args.tokens_per_domain, "seq_length": seq}
    result = A.write_report(args.out, captures, freq, tokenizer, flips, freq_source,
                            args.buckets, args.top, not args.no_figures, meta)
    logger.info(f"analyze: report {result.report} ({time.perf_counter() - t_start:.1f} s in total)")
    return result.report


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
    args = build_parser().parse_args(argv)
    from megatron.remoe.analysis import AnalysisError  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from megatron.remoe.errors import (  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
        ConfigError,
    )

    try:
        run(args)
    except (AnalysisError, ConfigError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
