"""Chaos resume, short version (the long one: `python tools/chaos_resume.py --kills 20`, figures in
docs/reliability.md): a 2-process gloo run under torchrun, killed three times -- kill -9 of the
whole job during a checkpoint save, SIGTERM to the launcher during an evaluation, kill -9 of one
worker between two micro-batches -- and restarted with the same command each time. The run that
finishes must be bit-identical to an uninterrupted one: model, optimizer and RNG shards, lambda,
scheduler, iteration and data position of the final checkpoint, and every metrics.jsonl record
(timings aside), with no duplicated line."""

import importlib.util
import os

import pytest

from tests.helpers.paths import ROOT

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(420)]


def load_harness():
    spec = importlib.util.spec_from_file_location(
        "chaos_resume", os.path.join(ROOT, "tools", "chaos_resume.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_kills_resume_bit_identical(tmp_path):
    harness = load_harness()
    kills = [("save", "kill9"), ("eval", "sigterm"), ("microbatch", "kill9-rank")]
    report = harness.chaos(str(tmp_path), kills, iters=10, save_interval=2, eval_interval=3,
                           seed=1, timeout=180)
    events = report["events"]
    assert report["kills"] == 3, events
    assert [(e["target"], e["signal"]) for e in events] == kills
    for event, (target, _) in zip(events, kills, strict=True):
        assert event["at"].startswith(target), event
        assert event["steps_lost"] >= 0 and "next_resumed_from" in event
    # SIGTERM: torchrun forwards it, the ranks save at the next step boundary: nothing lost
    assert events[1]["steps_lost"] == 0, events[1]
    assert events[0]["rc"] == -9 and events[2]["rc"] != 0
    assert report["identical"], report["differences"]
