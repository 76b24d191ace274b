"""One run's directory as the trainer leaves it: config.yaml, metrics.jsonl, summary.json."""

from __future__ import annotations

import json
import os
from typing import Optional

import yaml

from megatron.remoe.training.arguments import coerce_field_value, load_yaml_config
from megatron.remoe.training.config import TrainConfig
from megatron.remoe.training.validation import resolve_derived


def read_summary(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def is_finished(path: str, train_iters: int) -> bool:
    """A finished run: summary.json exists and says iterations == train_iters."""
    summary = read_summary(path)
    return bool(summary) and summary.get("iterations") == train_iters


def read_metrics(path: str) -> tuple[list, list]:
    """(train records, valid records) of a run's metrics.jsonl, one per iteration (the last one
    written wins: a resumed run re-logs the steps after its last checkpoint), sorted."""
    train, valid = {}, {}
    file = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                (valid if rec.get("split") == "valid" else train)[rec["iteration"]] = rec
    return [train[i] for i in sorted(train)], [valid[i] for i in sorted(valid)]


def existing_config(path: str) -> Optional[dict]:
    """The config.yaml written for an earlier launch of this run, as written (None: none)."""
    file = os.path.join(path, "config.yaml")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def resolved_config(path: str, world_size: int) -> dict:
    """A run's config.yaml with the defaults the trainer filled in (FFN width, query groups,
    global batch: validation.resolve_derived)."""
    values = {k: coerce_field_value(k, v) for k, v in load_yaml_config(os.path.join(path, "config.yaml"))
              .items()}
    return resolve_derived(TrainConfig(**values), world_size).to_dict()
