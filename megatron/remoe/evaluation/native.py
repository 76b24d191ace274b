"""The native backend: perplexity and multiple-choice accuracy computed here, with lm-eval's
definitions (used without lm-evaluation-harness, and tested to match it)."""

from __future__ import annotations

import math
import re
from typing import Sequence

from megatron.remoe.evaluation.scoring import ScoringModel


def _ppl_metrics(ll: float, tokens: int, words: int, nbytes: int) -> dict:
    return {"token_perplexity": math.exp(-ll / tokens) if tokens else float("nan"),
            "word_perplexity": math.exp(-ll / words) if words else float("nan"),
            "byte_perplexity": math.exp(-ll / nbytes) if nbytes else float("nan"),
            "bits_per_byte": -ll / nbytes / math.log(2) if nbytes else float("nan"),
            "loglikelihood": ll, "tokens": tokens, "words": words, "bytes": nbytes}


def count_words(doc: str) -> int:  # lm-eval's definition
    return len(re.split(r"\s+", doc))


def native_perplexity(sm: ScoringModel, docs: Sequence[str], tag: str) -> dict:
    lls = sm.rolling_loglikelihood(docs, tag)
    tokens = sum(len(sm.encode(d)) for d in docs)
    return _ppl_metrics(sum(lls), tokens, sum(count_words(d) for d in docs),
                        sum(len(d.encode("utf-8")) for d in docs))


def native_multiple_choice(sm: ScoringModel, items: Sequence[dict], tag: str) -> dict:
    pairs, spans = [], []
    for it in items:
        start = len(pairs)
        for ch in it["choices"]:
            pairs.append(sm.encode_pair(it["context"], ch))
        spans.append((start, len(pairs)))
    scored = sm.score(pairs, tag)
    acc = acc_norm = 0
    for it, (a, b) in zip(items, spans):
        lls = [scored[i][0] for i in range(a, b)]
        norm = [ll / len(ch.encode("utf-8")) for ll, ch in zip(lls, it["choices"])]
        acc += int(max(range(len(lls)), key=lls.__getitem__) == it["gold"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["gold"])
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "items": len(items),
            "chance": sum(1 / len(it["choices"]) for it in items) / n}
