"""Helpers for tests that run the trainer (`python -m megatron.remoe.pretrain`) or a tool as real
processes: launching on 1 process or under torchrun, with the exit code asserted. The tiny model, its
corpus and the trainer's environment are the parity harness's (tools/parity/tiny_gpt.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tools.parity.tiny_gpt import ROOT, free_port, pretrain_env, read_metrics


def pretrain_cmd(nproc: int = 1) -> list:
    if nproc == 1:
        return [sys.executable, "-m", "megatron.remoe.pretrain"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "megatron.remoe.pretrain"]


def run_pretrain(args, nproc: int = 1, timeout: float = 150, env: dict | None = None,
                 expect_rc: int | None = 0):
    """Run the trainer to completion; asserts the exit code unless expect_rc is None."""
    proc = subprocess.run(pretrain_cmd(nproc) + list(args), capture_output=True, text=True,
                          env=pretrain_env(env), timeout=timeout, cwd=ROOT)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                             f"{proc.stderr[-5000:]}"
    return proc


def uninterrupted_and_resumed(base, tmp_path, stop_at: int = 3) -> tuple:
    """Train `base` (args ending with its --train-iters) once straight through and once stopped
    after `stop_at` steps (--exit-interval) and resumed from its checkpoint; returns both runs'
    per-step metrics (uninterrupted, resumed), after checking the resume happened and logged
    every step once."""
    full, part = os.path.join(str(tmp_path), "full"), os.path.join(str(tmp_path), "part")
    run_pretrain(list(base) + ["--save", full])
    run_pretrain(list(base) + ["--save", part, "--exit-interval", str(stop_at)])
    out = run_pretrain(list(base) + ["--save", part, "--load", part])
    assert "resumed from" in out.stdout
    a = read_metrics(os.path.join(full, "metrics.jsonl"))
    b = read_metrics(os.path.join(part, "metrics.jsonl"))
    assert [r["iteration"] for r in b] == [r["iteration"] for r in a] == list(range(1, len(a) + 1))
    return a, b


def run_command(cmd, timeout: float = 120, expect: int = 0, env: dict | None = None):
    """Run any project command (a tool or the trainer, offline) with the tests' environment;
    asserts the exit code and returns the CompletedProcess."""
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=pretrain_env({"HF_HUB_OFFLINE": "1", **(env or {})}),
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == expect, \
        f"exit {proc.returncode} (want {expect})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def start_pretrain(args, log_path: str, nproc: int = 1, env: dict | None = None):
    """Start the trainer in the background, stdout+stderr to `log_path`; returns the Popen."""
    log = open(log_path, "w", encoding="utf-8")
    try:
        return subprocess.Popen(pretrain_cmd(nproc) + list(args), stdout=log,
                                stderr=subprocess.STDOUT, env=pretrain_env(env), cwd=ROOT,
                                start_new_session=True)
    finally:
        log.close()
