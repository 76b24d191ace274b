#!/usr/bin/env python
"""Tokenize jsonl / text / parquet / Hugging Face data into Megatron indexed datasets.

Examples:
  # one dataset from JSON Lines, GPT-2 BPE, documents separated by <|endoftext|>
  python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/my_corpus \\
      --tokenizer gpt2 --append-eod --workers 4

  # one dataset per domain: writes out/mix_web.{bin,idx,meta.json} and out/mix_code.*
  python tools/preprocess_data.py --input web=crawl.jsonl code=code.parquet \\
      --output-prefix out/mix --tokenizer path/to/tokenizer_dir --append-eod

  # train a byte-level BPE on the inputs first (saved to --tokenizer, which must not exist yet)
  python tools/preprocess_data.py --input books/ --text-mode paragraph --output-prefix out/books \\
      --tokenizer out/bpe-16k --train-tokenizer 16384 --append-eod

Errors (missing/empty input, wrong --json-key, invalid UTF-8, ...) print one line naming the
fix and exit with status 2; no partial output is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runnable from a checkout without installing the package. Keep module-level imports light:
# worker processes are spawned and re-import this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.remoe.data.errors import DataError
from megatron.remoe.data.preprocess import PreprocessConfig, PreprocessJob, preprocess
from megatron.remoe.data.readers import read_documents, resolve_inputs
from megatron.remoe.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path line; stdlib only)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", required=True, metavar="[DOMAIN=]PATH",
                   help="files, directories, globs, a saved HF dataset dir or hf:NAME[:CONFIG]; "
                        "DOMAIN=PATH writes one dataset per domain")
    p.add_argument("--output-prefix", required=True,
                   help="output prefix; with several domains, <prefix>_<domain>")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer directory (default gpt2)")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of this size on the inputs, save it to --tokenizer")
    p.add_argument("--json-key", default="text", help="text field of jsonl/parquet/HF rows (default text)")
    p.add_argument("--text-mode", choices=("file", "paragraph"), default="file",
                   help="plain text: one document per file (default) or per blank-line paragraph")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    p.add_argument("--per-input", action="store_true",
                   help="one dataset per input path (domain = file name without extension)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--hf-split", default="train", help="split of HF datasets (default train)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for ext in (".gz", ".jsonl", ".json", ".parquet", ".txt", ".md", ".text"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name or "data"


def build_jobs(args: argparse.Namespace):
    domains: dict[str, list[str]] = {}
    for item in args.input:
        domain, sep, path = item.partition("=")
        if not sep or item.startswith("hf:") or os.path.exists(item):
            domain, path = (_stem(item) if args.per_input else ""), item
        elif not domain:
            raise DataError(f"--input {item!r}: empty domain name before '='")
        domains.setdefault(domain, []).append(path)
    if len(domains) == 1:
        (domain, paths), = domains.items()
        return [PreprocessJob(domain or os.path.basename(args.output_prefix), paths, args.output_prefix)]
    if "" in domains:
        raise DataError("mix of DOMAIN=PATH and plain PATH inputs; fix: give every input a domain")
    return [PreprocessJob(d, paths, f"{args.output_prefix}_{d}") for d, paths in domains.items()]


def main(argv: list[str] | None = None) -> int:
    configure()  # the console: progress lines, known noise filtered
    args = parse_args(argv)

    try:
        config = PreprocessConfig(json_key=args.json_key, text_mode=args.text_mode,
                                  append_eod=args.append_eod, workers=args.workers,
                                  hf_split=args.hf_split, progress=not args.quiet)
        jobs = build_jobs(args)
        if args.train_tokenizer:
            if os.path.exists(args.tokenizer):
                raise DataError(f"--tokenizer {args.tokenizer!r} already exists; fix: choose a new "
                                f"directory to save the trained tokenizer, or drop --train-tokenizer")
            paths = [p for job in jobs for p in resolve_inputs(job.inputs)]
            # Validate by reading once before training (errors name file and line).
            texts = (d for p in paths
                     for d in read_documents(p, args.json_key, args.text_mode, args.hf_split))
            tokenizer = train_bpe_tokenizer(texts, args.train_tokenizer)
        else:
            tokenizer = load_tokenizer(args.tokenizer)
        infos = preprocess(jobs, tokenizer, config)
        if args.train_tokenizer:
            tokenizer.save(args.tokenizer)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    for job, info in zip(jobs, infos):
        print(f"{job.output_prefix}: {info.documents} documents, {info.tokens} tokens "
              f"({info.dtype}, tokenizer {info.tokenizer['name']} {info.tokenizer_fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
