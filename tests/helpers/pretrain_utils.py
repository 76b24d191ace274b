"""Helpers for tests that run the trainer (`python -m megatron.remoe.pretrain`) as real processes:
a tiny model, a tiny real corpus (stdlib .py files, a byte-level BPE, Megatron .bin/.idx), launching
on 1 process or under torchrun, and reading the JSONL metrics back."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig

from tests.helpers.dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
         # lambda_0 large enough that the L1 term matters within a few steps
         "--moe-relu-l1-reg-coeff-init", "1e-3"]


def build_corpus(out, num_files: int = 60, vocab: int = 512, chars_per_file: int = 8000) -> dict:
    """Stdlib code -> a `vocab`-token byte-level BPE -> train/valid .bin/.idx under `out`.
    Returns {"tokenizer": dir, "train": prefix, "valid": prefix}."""
    from megatron.remoe.data.preprocess import PreprocessConfig, preprocess_files
    from megatron.remoe.data.tokenizer import train_bpe_tokenizer

    out = str(out)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:num_files]
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read()[:chars_per_file])
    tok = train_bpe_tokenizer(texts, vocab)
    tok_dir = tok.save(os.path.join(out, "tokenizer"))
    prefixes = {}
    n_valid = max(1, len(texts) // 10)
    for split, docs in (("train", texts[:-n_valid]), ("valid", texts[-n_valid:])):
        path = os.path.join(out, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for t in docs:
                fh.write(json.dumps({"text": t}) + "\n")
        prefixes[split] = os.path.join(out, split)
        preprocess_files([path], prefixes[split], tok,
                         PreprocessConfig(append_eod=True, progress=False))
    return {"tokenizer": tok_dir, "train": prefixes["train"], "valid": prefixes["valid"]}


def data_args(data: dict) -> list:
    return ["--data-path", data["train"], "--valid-data-path", data["valid"],
            "--tokenizer", data["tokenizer"], "--data-cache-path",
            os.path.join(os.path.dirname(data["train"]), "cache")]


def pretrain_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra or {})
    return env


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


def read_metrics(path: str, split: str = "train") -> list:
    with open(path, encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r["split"] == split]
