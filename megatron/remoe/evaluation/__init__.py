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

Modules: tasks.py (held-out text, the next-line items, task names), scoring.py (the model and its
tokenizer), native.py and harness.py (the two backends), report.py (`evaluate`, results files).
"""

from megatron.remoe.evaluation.harness import (
    have_lm_eval,
    hub_reachable,
    make_lm_class,
    run_lm_eval,
    write_local_tasks,
)
from megatron.remoe.evaluation.native import count_words, native_multiple_choice, native_perplexity
from megatron.remoe.evaluation.report import evaluate, results_markdown, write_results
from megatron.remoe.evaluation.scoring import RoutingTally, ScoringModel, load_scoring_model
from megatron.remoe.evaluation.tasks import (
    MC_TASK,
    PAPER_TASKS,
    PPL_PREFIX,
    EvaluationError,
    build_nextline_items,
    cap_documents,
    demo_corpus_texts,
    indexed_prefix_texts,
    nonblank_lines,
    ppl_task_name,
    read_text_file,
)

__all__ = [
    "MC_TASK", "PAPER_TASKS", "PPL_PREFIX", "EvaluationError", "RoutingTally", "ScoringModel",
    "nonblank_lines", "build_nextline_items", "cap_documents", "count_words", "demo_corpus_texts",
    "evaluate", "have_lm_eval", "hub_reachable", "indexed_prefix_texts", "load_scoring_model",
    "make_lm_class", "native_multiple_choice", "native_perplexity", "ppl_task_name",
    "read_text_file", "results_markdown", "run_lm_eval", "write_local_tasks", "write_results",
]
