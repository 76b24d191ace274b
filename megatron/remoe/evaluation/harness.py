"""The lm-evaluation-harness backend: `RemoeLM`, the local tasks written as lm-eval YAML + JSONL,
and the paper's zero-shot tasks (HF hub datasets, when reachable)."""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Optional, Sequence

from megatron.remoe.evaluation.scoring import ScoringModel
from megatron.remoe.evaluation.tasks import MC_TASK, ppl_task_name


def have_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401, PLC0415 -- optional extra (eval)
    except ImportError:
        return False
    return True


def make_lm_class():
    """`RemoeLM(lm_eval.api.model.LM)` wrapping a ScoringModel (built lazily: lm-eval optional)."""
    from lm_eval.api.model import LM  # noqa: PLC0415 -- optional extra (eval)

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
        name = ppl_task_name(domain)
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
    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets  # noqa: PLC0415 -- optional extra (data)

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass


def run_lm_eval(sm: ScoringModel, tasks: Sequence[str], task_dir: Optional[str] = None,
                limit: Optional[int] = None) -> dict:
    """simple_evaluate on `tasks` (local ones found in task_dir) with RemoeLM; returns lm-eval's
    'results' dict {task: {"metric,filter": value}}."""
    import lm_eval  # noqa: PLC0415 -- optional extra (eval)
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 -- optional extra (eval)

    _lm_eval_quiet()
    tm = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    lm = make_lm_class()(sm)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, num_fewshot=0,
                                  limit=limit, bootstrap_iters=0, log_samples=False,
                                  verbosity="ERROR")
    return res["results"]


def metric_value(res: dict, name: str):
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
