#!/usr/bin/env python
"""Evaluate an exported (Hugging Face) megatron-remoe model, offline first.

    python tools/evaluate.py --model HF_DIR --out RESULTS_DIR \
        [--demo-corpus DIR] [--text DOMAIN=FILE ...] [--data DOMAIN=PREFIX ...] \
        [--max-chars-per-domain 20000] [--mc-items-per-domain 50] [--num-choices 4] \
        [--backend auto|lm-eval|native] [--no-paper-tasks] [--paper-limit N] \
        [--batch-size 8] [--max-length N] [--dtype fp32|bf16] [--seed 1234]

Local tasks: per-domain perplexity / bits-per-byte on held-out text and the next-line multiple-
choice task built from it (see megatron/remoe/evaluation.py). The paper's zero-shot tasks
(arc_challenge, arc_easy, boolq, hellaswag, lambada_openai, piqa, race) run through
lm-evaluation-harness when the HF hub is reachable, and are skipped with a message otherwise.
Writes RESULTS_DIR/results.json and results.md (with realised experts per token per task).
Exit codes: 0 success, 2 bad arguments / inputs (one-line error).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path line; stdlib only)


class UsageError(ValueError):
    pass


def _pairs(items, flag):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"{flag} {item!r}: expected DOMAIN=PATH")
        k, v = item.split("=", 1)
        if not k or not v:
            raise UsageError(f"{flag} {item!r}: expected DOMAIN=PATH")
        out.setdefault(k, []).append(v)
    return out


def build_parser():
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported HF model folder")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--demo-corpus", help="demo corpus dir (<domain>/test.jsonl; built there if "
                                         "missing) or the demo data root holding corpus/")
    p.add_argument("--split", default="test", choices=["test", "valid"],
                   help="demo-corpus split to evaluate on")
    p.add_argument("--text", action="append", metavar="DOMAIN=FILE",
                   help="held-out text: .txt (one document) or .jsonl ({'text': ...} per line)")
    p.add_argument("--data", action="append", metavar="DOMAIN=PREFIX",
                   help="tokenized Megatron prefix (.bin/.idx), decoded with the model's "
                        "tokenizer")
    p.add_argument("--max-chars-per-domain", type=int, default=20000)
    p.add_argument("--mc-items-per-domain", type=int, default=50)
    p.add_argument("--num-choices", type=int, default=4,
                   help="choices per next-line item (1 true + N-1 distractors)")
    p.add_argument("--context-lines", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=["auto", "lm-eval", "native"])
    p.add_argument("--paper-tasks", default=True, action=argparse.BooleanOptionalAction,
                   help="try the paper's zero-shot tasks (need the HF hub)")
    p.add_argument("--paper-limit", type=int, help="examples per paper task (lm-eval --limit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context window (default: the model's)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    parser = build_parser()

    def error(message):
        raise UsageError(message)

    parser.error = error
    try:
        args = parser.parse_args(argv)
        texts, prefixes = _pairs(args.text, "--text"), _pairs(args.data, "--data")
        if not (args.demo_corpus or texts or prefixes):
            raise UsageError("no evaluation text: pass --demo-corpus DIR, --text DOMAIN=FILE or "
                             "--data DOMAIN=PREFIX")
        for name in ("max_chars_per_domain", "mc_items_per_domain", "batch_size"):
            if getattr(args, name) < (0 if name == "mc_items_per_domain" else 1):
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model} is not a Hugging Face model folder "
                             "(no config.json)")
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import transformers  # noqa: F401, PLC0415 -- optional extra (eval)
        except ImportError:
            raise UsageError("transformers is not installed; pip install 'megatron-remoe[eval]'")
        from megatron.remoe import evaluation as ev  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

        try:
            sm = ev.load_scoring_model(args.model, args.dtype, args.batch_size, args.max_length)
            domain_docs = {}
            if args.demo_corpus:
                domain_docs.update(ev.demo_corpus_texts(args.demo_corpus, args.split))
            for domain, files in texts.items():
                domain_docs[domain] = [d for f in files for d in ev.read_text_file(f)]
            for domain, pfx in prefixes.items():
                domain_docs[domain] = [d for p in pfx for d in
                                        ev.indexed_prefix_texts(p, sm.decode, eod=sm.eot_id)]
            full_docs = domain_docs
            domain_docs = {d: ev.cap_documents(docs, args.max_chars_per_domain)
                           for d, docs in full_docs.items()}
            domain_docs = {d: docs for d, docs in domain_docs.items() if docs}
            if not domain_docs:
                raise ev.EvaluationError("the evaluation text is empty")
            items = ev.build_nextline_items(domain_docs, args.mc_items_per_domain,
                                            args.num_choices, args.context_lines,
                                            seed=args.seed) if args.mc_items_per_domain else []
            results = ev.evaluate(sm, domain_docs, items, backend=args.backend,
                                  paper_tasks=ev.PAPER_TASKS if args.paper_tasks else (),
                                  paper_limit=args.paper_limit)
        except ev.EvaluationError as e:
            raise UsageError(str(e)) from None
        results["data"] = {d: {"documents": len(v), "chars": sum(len(x) for x in v)}
                           for d, v in domain_docs.items()}
        results["nextline"] = {"items": len(items), "num_choices": args.num_choices,
                               "context_lines": args.context_lines, "seed": args.seed}
        j, m = ev.write_results(results, args.out)
        print(open(m, encoding="utf-8").read())
        print(f"evaluate: wrote {j} and {m}")
        return 0
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
