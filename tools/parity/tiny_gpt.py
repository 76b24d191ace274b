"""The tiny GPT that the parity harness (and the tests) train as real processes: its flags, a tiny
real corpus (stdlib .py files, a byte-level BPE, Megatron .bin/.idx), the trainer's environment and
reading the JSONL metrics back."""

from __future__ import annotations

import glob
import json
import os
import socket
import sysconfig

from megatron.remoe.data.preprocess import PreprocessConfig, preprocess_files
from megatron.remoe.data.tokenizer import train_bpe_tokenizer

# the repository root: the trainer's working directory and the first PYTHONPATH entry of its processes
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
         # lambda_0 large enough that the L1 term matters within a few steps
         "--moe-relu-l1-reg-coeff-init", "1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_corpus(out, num_files: int = 60, vocab: int = 512, chars_per_file: int = 8000) -> dict:
    """Stdlib code -> a `vocab`-token byte-level BPE -> train/valid .bin/.idx under `out`.
    Returns {"tokenizer": dir, "train": prefix, "valid": prefix}."""
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


def read_metrics(path: str, split: str = "train") -> list:
    with open(path, encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r["split"] == split]
