"""Everything together: `evaluate` runs the tasks on one backend; the results as JSON and a
Markdown table."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Optional, Sequence

from megatron.remoe.evaluation.harness import (
    have_lm_eval,
    hub_reachable,
    metric_value,
    run_lm_eval,
    write_local_tasks,
)
from megatron.remoe.evaluation.native import count_words, native_multiple_choice, native_perplexity
from megatron.remoe.evaluation.scoring import ScoringModel
from megatron.remoe.evaluation.tasks import MC_TASK, PAPER_TASKS, EvaluationError, ppl_task_name
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)


def evaluate(sm: ScoringModel, domain_docs: dict, items: Sequence[dict],
             backend: str = "auto", paper_tasks: Sequence[str] = PAPER_TASKS,
             paper_limit: Optional[int] = None, work_dir: Optional[str] = None) -> dict:
    """Run the local tasks (and the paper's tasks when reachable). Returns the results dict
    written by `write_results`."""
    if backend == "auto":
        backend = "lm-eval" if have_lm_eval() else "native"
    if backend == "lm-eval" and not have_lm_eval():
        raise EvaluationError("backend lm-eval requested but lm-evaluation-harness is not "
                              "installed; pip install 'megatron-remoe[eval]' or use --backend "
                              "native")
    t0 = time.perf_counter()
    if not items:
        logger.info(f"eval: {MC_TASK}: no items (it needs at least two documents to draw distractors "
                    "from other documents)")
    if backend == "native":
        tasks = _local_tasks_native(sm, domain_docs, items)
    else:
        tasks = _local_tasks_lm_eval(sm, domain_docs, items, work_dir)
    skipped = _paper_tasks(sm, paper_tasks, paper_limit, tasks)
    for name, tally in sm.tallies.items():
        if name in tasks:
            tasks[name]["routing"] = tally.summary()
    return {"model": sm.name, "model_type": sm.model_type, "backend": backend,
            "max_length": sm.max_length, "tasks": tasks, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 2)}


def _local_tasks_native(sm: ScoringModel, domain_docs: dict, items: Sequence[dict]) -> dict:
    """Per-domain perplexity and the next-line task, computed here."""
    tasks: dict = {}
    for name, domain in sorted({ppl_task_name(d): d for d in domain_docs}.items()):
        tasks[name] = {"type": "perplexity", "domain": domain,
                       **native_perplexity(sm, domain_docs[domain], name)}
        logger.info(f"eval: {name}: bits/byte {tasks[name]['bits_per_byte']:.4f}")
    if items:
        tasks[MC_TASK] = {"type": "multiple_choice", **native_multiple_choice(sm, items,
                                                                                MC_TASK)}
        logger.info(f"eval: {MC_TASK}: acc {tasks[MC_TASK]['acc']:.4f}")
    return tasks


def _local_tasks_lm_eval(sm: ScoringModel, domain_docs: dict, items: Sequence[dict],
                         work_dir: Optional[str]) -> dict:
    """The same tasks written as lm-eval tasks and run by lm-evaluation-harness."""
    ppl_names = {ppl_task_name(d): d for d in domain_docs}
    tasks: dict = {}
    tmp = work_dir or tempfile.mkdtemp(prefix="remoe_eval_tasks_")
    names = write_local_tasks(tmp, domain_docs, items)
    res = run_lm_eval(sm, names, tmp)
    for name in names:
        r = res.get(name, {})
        if name == MC_TASK:
            tasks[name] = {"type": "multiple_choice", "acc": metric_value(r, "acc"),
                           "acc_norm": metric_value(r, "acc_norm"), "items": len(items),
                           "chance": sum(1 / len(it["choices"]) for it in items) /
                           max(len(items), 1)}
            logger.info(f"eval: {name}: acc {tasks[name]['acc']:.4f}")
        else:
            domain = ppl_names[name]
            docs = domain_docs[domain]
            nbytes = sum(len(d.encode("utf-8")) for d in docs)
            bpb = metric_value(r, "bits_per_byte")
            tasks[name] = {"type": "perplexity", "domain": domain,
                           "word_perplexity": metric_value(r, "word_perplexity"),
                           "byte_perplexity": metric_value(r, "byte_perplexity"),
                           "bits_per_byte": bpb, "bytes": nbytes,
                           "tokens": sum(len(sm.encode(d)) for d in docs),
                           "words": sum(count_words(d) for d in docs)}
            ll = -bpb * nbytes * math.log(2)
            tasks[name]["token_perplexity"] = math.exp(-ll / max(tasks[name]["tokens"], 1))
            logger.info(f"eval: {name}: bits/byte {bpb:.4f}")
    return tasks


def _paper_tasks(sm: ScoringModel, paper_tasks: Sequence[str], paper_limit: Optional[int],
                 tasks: dict) -> dict:
    """The paper's zero-shot tasks (HF-hub datasets) into `tasks`; returns {task: why skipped}."""
    skipped: dict = {}
    if not paper_tasks:
        return skipped
    if not have_lm_eval():
        for t in paper_tasks:
            skipped[t] = "lm-evaluation-harness is not installed"
    elif not hub_reachable():
        for t in paper_tasks:
            skipped[t] = "the HF hub (huggingface.co) is unreachable: offline"
        logger.info(f"eval: skipping the paper's zero-shot tasks ({', '.join(paper_tasks)}): their "
                    "datasets download from the HF hub, which is unreachable here")
    else:
        for t in paper_tasks:
            try:
                r = run_lm_eval(sm, [t], limit=paper_limit).get(t, {})
                tasks[t] = {"type": "zero_shot", "acc": metric_value(r, "acc"),
                            "acc_norm": metric_value(r, "acc_norm"),
                            "perplexity": metric_value(r, "perplexity")}
            except Exception as e:  # noqa: BLE001 - dataset download etc.
                skipped[t] = " ".join(str(e).split())[:200] or type(e).__name__
                logger.info(f"eval: {t} skipped: {skipped[t]}")
    return skipped


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
