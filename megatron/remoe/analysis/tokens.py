"""The analysed tokens: per-domain evaluation windows read from Megatron indexed datasets, and the
default data of a run (its validation prefixes)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.data.errors import DataError
from megatron.remoe.data.indexed import load_indexed_dataset
from megatron.remoe.logs import get_logger
from megatron.remoe.training.data import domain_names_of
from megatron.remoe.training.validation import parse_blend

logger = get_logger(__name__)


@dataclass
class EvalTokens:
    """The analysed tokens: per-domain token streams cut into sequences of at most seq_length."""

    domain_names: list
    sequences: list  # list of 1-D int64 arrays
    seq_domain: list  # domain index of each sequence
    seq_length: int

    @property
    def token_ids(self) -> np.ndarray:
        return np.concatenate(self.sequences) if self.sequences else np.zeros(0, np.int64)

    @property
    def domains(self) -> np.ndarray:
        return np.concatenate([np.full(len(s), d, np.int64)
                               for s, d in zip(self.sequences, self.seq_domain)]) \
            if self.sequences else np.zeros(0, np.int64)

    def tokens_per_domain(self) -> dict:
        counts = {d: 0 for d in self.domain_names}
        for s, d in zip(self.sequences, self.seq_domain):
            counts[self.domain_names[d]] += len(s)
        return counts


def open_indexed(prefix: str, tokenizer=None):
    """IndexedDataset of `prefix` with the data helper's integrity and tokenizer checks."""
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise AnalysisError(f"data prefix {prefix}: {prefix}.bin/.idx not found")
    try:
        return load_indexed_dataset(prefix, tokenizer if hasattr(tokenizer, "fingerprint")
                                    else None)
    except DataError as e:
        raise AnalysisError(" ".join(str(e).split())) from None


def read_domain_tokens(prefix: str, max_tokens: int, tokenizer=None) -> np.ndarray:
    """The first `max_tokens` tokens of a dataset, documents in order (EOD tokens as stored)."""
    ds = open_indexed(prefix, tokenizer)
    parts, total = [], 0
    for i in range(len(ds)):
        if total >= max_tokens:
            break
        doc = np.asarray(ds[i], dtype=np.int64)
        parts.append(doc[: max_tokens - total])
        total += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def make_eval_tokens(domain_prefixes: dict, tokens_per_domain: int, seq_length: int,
                     tokenizer=None) -> EvalTokens:
    """Read up to `tokens_per_domain` tokens of every domain and cut them into sequences."""
    if tokens_per_domain < 2:
        raise AnalysisError("--tokens-per-domain must be at least 2")
    names, seqs, seq_dom = [], [], []
    for d, (name, prefix) in enumerate(domain_prefixes.items()):
        toks = read_domain_tokens(prefix, tokens_per_domain, tokenizer)
        if len(toks) == 0:
            raise AnalysisError(f"data prefix {prefix} (domain {name}) holds no tokens")
        names.append(name)
        for start in range(0, len(toks), seq_length):
            seqs.append(toks[start:start + seq_length])
            seq_dom.append(d)
        if len(toks) < tokens_per_domain:
            logger.info(f"analyze: domain {name}: only {len(toks):,} tokens available "
                        f"(asked for {tokens_per_domain:,})")
    return EvalTokens(names, seqs, seq_dom, seq_length)



def default_data(cfg, split: str = "valid") -> tuple:
    """({domain: prefix} to analyse, [training prefixes]) from a run's config: its validation
    prefixes (`--valid-data-path`; named by their basename, as the trainer does), or, with
    split='test', the sibling `.../test/<domain>` prefixes of the demo data layout."""
    train = parse_blend(cfg.data_path, "data_path")[0] if cfg.data_path else []
    if not cfg.valid_data_path:
        raise AnalysisError("the checkpoint's config has no --valid-data-path; give the data to "
                            "analyse with --data DOMAIN=PREFIX ...")
    prefixes = parse_blend(cfg.valid_data_path, "valid_data_path")[0]
    if split == "test":
        out = []
        for p in prefixes:
            parent, name = os.path.split(p)
            root, sub = os.path.split(parent)
            t = os.path.join(root, "test", name)
            if sub != "valid" or not os.path.isfile(t + ".idx"):
                raise AnalysisError(f"no test split next to {p} (expected {t}.bin/.idx); use "
                                    "--data DOMAIN=PREFIX ...")
            out.append(t)
        prefixes = out
    return dict(zip(domain_names_of(prefixes), prefixes)), train
