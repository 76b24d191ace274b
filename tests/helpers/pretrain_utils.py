"""Helpers for tests that run the trainer (`python -m megatron.remoe.pretrain`) or a tool as real
processes: launching on 1 process or under torchrun, with the exit code asserted. The tiny model, its
corpus and the trainer's environment are the parity harness's (tools/parity/tiny_gpt.py)."""

from __future__ import annotations

import subprocess
import sys

from tools.parity.tiny_gpt import ROOT, free_port, pretrain_env


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
