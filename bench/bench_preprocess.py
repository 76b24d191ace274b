#!/usr/bin/env python
"""Preprocessing throughput (tokens/s) with 1 and 2 workers on the demo corpus.

  python bench/bench_preprocess.py                       # whole train split, GPT-2 BPE
  python bench/bench_preprocess.py --domains code docs   # local-only domains (no download)
  python bench/bench_preprocess.py --tokenizer bpe --max-chars 5000000

Builds (or reuses) the demo corpus under --out-dir, tokenizes the chosen domains' train split
once per worker count into a temporary directory, checks the outputs are byte-identical and
prints both rates, their ratio and the machine.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import sys
import tempfile
import time

import tokenizers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.remoe.data.corpus import CorpusConfig, build_demo_corpus, iter_texts
from megatron.remoe.data.demo import prepare_demo_data
from megatron.remoe.data.errors import DataError
from megatron.remoe.data.preprocess import PreprocessConfig, PreprocessJob, preprocess
from megatron.remoe.data.tokenizer import load_tokenizer
from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}; {usable} usable cores (os.cpu_count={os.cpu_count()}); "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
            f"tokenizers {tokenizers.__version__}")


def main(argv: list[str] | None = None) -> int:
    configure()  # the console: progress lines, known noise filtered
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/demo_data", help="demo corpus location (cached)")
    p.add_argument("--domains", nargs="+", default=None, help="subset of demo domains")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2', 'bpe' (demo BPE 8192) or a dir")
    p.add_argument("--max-chars", type=int, default=None, help="cap the text per run (chars)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)

    config = CorpusConfig(**({"domains": tuple(args.domains)} if args.domains else {}))
    try:
        manifest = build_demo_corpus(os.path.join(args.out_dir, "corpus"), config=config)
        if args.tokenizer == "bpe":
            tok = load_tokenizer(prepare_demo_data(args.out_dir, corpus_config=config).tokenizer_dir)
        else:
            tok = load_tokenizer(args.tokenizer)
    except DataError as e:
        print(f"error: {e}\n(hint: --domains code docs needs no download)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        inputs = [manifest.path(d, "train") for d in config.domains]
        if args.max_chars:  # a prefix of the documents, written once as one jsonl file
            path, total = os.path.join(tmp, "subset.jsonl"), 0
            with open(path, "w", encoding="utf-8") as f:
                for text in (t for i in inputs for t in iter_texts(i)):
                    if total >= args.max_chars:
                        break
                    f.write(json.dumps({"text": text}) + "\n")
                    total += len(text)
            inputs = [path]
        chars = sum(manifest.entry(d, "train")["chars"] for d in config.domains) \
            if not args.max_chars else total
        # Import megatron.core (seconds) before timing so that it is not charged to one run.
        import megatron.core.datasets.indexed_dataset  # noqa: F401, PLC0415 -- loaded before timing so that no run is charged for it

        results = {}
        for workers in args.workers:
            prefix = os.path.join(tmp, f"w{workers}")
            cfg = PreprocessConfig(append_eod=True, workers=workers, progress=False)
            t0 = time.perf_counter()
            info, = preprocess([PreprocessJob("bench", inputs, prefix)], tok, cfg)
            seconds = time.perf_counter() - t0  # includes worker start-up
            results[workers] = (info.tokens, seconds, prefix)
        base_tokens, base_seconds, base_prefix = results[args.workers[0]]
        identical = all(filecmp.cmp(base_prefix + s, r[2] + s, shallow=False)
                        for r in results.values() for s in (".bin", ".idx"))

    print(f"machine:   {machine_info()}")
    print(f"data:      {', '.join(config.domains)} train split, {chars:,} chars, "
          f"{base_tokens:,} tokens, tokenizer {tok.name} (vocab {tok.vocab_size})")
    print(f"{'workers':>8} {'seconds':>9} {'tokens/s':>12} {'speed-up':>9}")
    for workers, (tokens, seconds, _) in results.items():
        print(f"{workers:>8} {seconds:>9.2f} {tokens / seconds:>12,.0f} "
              f"{base_seconds / seconds:>8.2f}x")
    print(f"outputs byte-identical across worker counts: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
