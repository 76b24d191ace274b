"""Train/valid GPT datasets from Megatron indexed data (.bin/.idx), via megatron.core.datasets.

* training: one (possibly blended) GPTDataset of exactly `train_iters * global_batch_size` samples;
* validation: one GPTDataset per `--valid-data-path` prefix (per-domain losses), or the valid part
  of `--split`; each evaluation reads the same first `eval_iters * global_batch_size` samples, so
  evaluations at different steps are comparable.

Sample order is a deterministic function of the seed, the data and the sample count (GPTDataset's
shuffle index); `PretrainingBatchSampler` starts at `consumed_samples`, which is how a resumed run
continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron.remoe.data.indexed import check_indexed_files, check_token_ids, check_tokenizer_match
from megatron.remoe.data.tokenizer import load_tokenizer
from megatron.remoe.errors import ConfigError
from megatron.remoe.training.config import TrainConfig
from megatron.remoe.training.validation import parse_blend


@dataclass
class MockTokenizer:
    """What GPTDatasetConfig needs from a tokenizer, for --mock-data."""

    vocab_size: int
    eod: int = 0

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "MockTokenizer", "vocab_size": self.vocab_size}


def load_run_tokenizer(cfg: TrainConfig):
    """The tokenizer of the data (megatron.remoe.data), or a stub for mock data."""
    if cfg.mock_data and not cfg.tokenizer:
        return MockTokenizer(cfg.vocab_size)

    return load_tokenizer(cfg.tokenizer)


def padded_vocab_size(vocab_size: int, cfg: TrainConfig) -> int:
    """Megatron's padding: a multiple of make_vocab_size_divisible_by * TP (GEMM-friendly, and
    the output layer splits evenly over TP ranks)."""
    multiple = cfg.make_vocab_size_divisible_by * cfg.tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def check_data_matches_tokenizer(cfg: TrainConfig, tokenizer) -> None:
    """Fail early (before any process group or training) when a prefix is broken: missing,
    truncated or corrupt .bin/.idx (sizes and every index entry), no documents, tokenized with
    another tokenizer (sidecar), or token ids outside the vocabulary (all of a .bin up to 256 MiB
    or with --full-data-check, sampled blocks of larger ones)."""
    if cfg.mock_data:
        return

    for name in ("data_path", "valid_data_path"):
        items = getattr(cfg, name)
        if not items:
            continue
        for prefix in parse_blend(items, name)[0]:
            try:
                documents, tokens = check_indexed_files(prefix)
                if not documents or not tokens:
                    raise ValueError(f"{prefix}.bin/.idx hold no documents; fix: preprocess a "
                                     "non-empty input for this prefix or drop it from "
                                     f"--{name.replace('_', '-')}")
                check_tokenizer_match(prefix, tokenizer)
                check_token_ids(prefix, tokenizer.vocab_size, full=cfg.full_data_check)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
            if name == "data_path" and cfg.split:
                _check_split_not_empty(cfg, prefix, documents)


def _check_split_not_empty(cfg: TrainConfig, prefix: str, documents: int) -> None:
    """The train part of --split (and the valid part, when evaluating) must get documents of
    `prefix`; megatron-core's builder assigns round(share * documents) of them to each part."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    parts = [("training", 0, "give the train part a non-zero share")]
    if cfg.eval_iters > 0 and not cfg.valid_data_path:
        parts.append(("validation", 1, "give the valid part a non-zero share or use "
                                       "--valid-data-path"))
    for what, i, fix in parts:
        bounds = matrix[i]
        count = 0 if bounds is None else (int(round(bounds[1] * documents))
                                          - int(round(bounds[0] * documents)))
        if count <= 0:
            of = "" if bounds is None else f" of {prefix} ({documents} documents)"
            raise ConfigError(f"split={cfg.split} leaves no {what} documents{of}; {fix}")


def _gpt_config(cfg: TrainConfig, tokenizer, **blend_kwargs):
    return GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        # the local/TE attention builds the causal mask itself: no [s, s] mask per sample
        create_attention_mask=False, path_to_cache=cfg.data_cache_path,
        mid_level_dataset_surplus=0.005, **blend_kwargs)


def _build(cfg: TrainConfig, tokenizer, sizes: list, **blend_kwargs):
    cls = MockGPTDataset if cfg.mock_data else GPTDataset
    config = _gpt_config(cfg, tokenizer, **blend_kwargs)
    # Every rank builds (and reads) its own copy: no broadcast of batches across TP ranks needed.
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


def domain_names_of(prefixes: list) -> list:
    names = [os.path.basename(p.rstrip("/")) or p for p in prefixes]
    if len(set(names)) != len(names):  # e.g. .../a/text_document and .../b/text_document
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names


def build_datasets(cfg: TrainConfig, tokenizer):
    """(train dataset, {valid name: dataset}, {valid name: weight}).

    The overall validation loss is the weighted mean of the per-set losses: blend weights when
    given, equal weights otherwise.
    """
    gbs = cfg.global_batch_size
    train_samples = cfg.train_iters * gbs
    valid_samples = max(cfg.eval_iters, 1) * gbs
    evaluate = cfg.eval_iters > 0
    if cfg.mock_data:
        train, valid, _ = _build(cfg, tokenizer, [train_samples, valid_samples, 0],
                                 blend=None, split="99,1,0")
        return train, ({"mock": valid} if evaluate else {}), {"mock": 1.0}
    train_blend = parse_blend(cfg.data_path, "data_path")
    if cfg.valid_data_path:
        train = _build(cfg, tokenizer, [train_samples, 0, 0],
                       blend_per_split=[train_blend, None, None])[0]
        prefixes, weights = parse_blend(cfg.valid_data_path, "valid_data_path")
        names = domain_names_of(prefixes)
        weights = weights or [1.0] * len(prefixes)
        valid = {}
        if evaluate:
            for name, prefix in zip(names, prefixes):
                valid[name] = _build(cfg, tokenizer, [0, valid_samples, 0],
                                     blend_per_split=[None, ([prefix], None), None])[1]
        total = sum(weights)
        return train, valid, {n: w / total for n, w in zip(names, weights)}
    if cfg.split:
        train, valid, _ = _build(cfg, tokenizer, [train_samples, valid_samples, 0],
                                 blend=train_blend, split=cfg.split)
        if train is None:
            raise ConfigError(f"split={cfg.split} leaves no training documents; give the train "
                              "part a non-zero share")
        if valid is None and evaluate:
            raise ConfigError(f"split={cfg.split} leaves no validation documents; give the "
                              "valid part a non-zero share or use --valid-data-path")
        return train, ({"valid": valid} if evaluate and valid is not None else {}), {"valid": 1.0}
    train = _build(cfg, tokenizer, [train_samples, 0, 0], blend=train_blend, split="100,0,0")[0]
    return train, {}, {}


class PretrainingBatchSampler:
    """Consecutive global batches starting at `consumed_samples`; each data-parallel rank takes its
    slice of every `micro_batch_size * dp` block (Megatron's MegatronPretrainingSampler)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total, self.start = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list]:
        block = self.mbs * self.dp_size
        start = self.start
        while start + block <= self.total:
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += block

    def __len__(self) -> int:
        return max(self.total - self.start, 0) // (self.mbs * self.dp_size)


def make_loader(dataset, consumed_samples: int, total_samples: Optional[int],
                cfg: TrainConfig, dp_rank: int, dp_size: int):
    """A DataLoader of this rank's micro-batches (dicts of [mbs, seq] tensors)."""
    total = min(len(dataset), total_samples) if total_samples else len(dataset)
    sampler = PretrainingBatchSampler(total, consumed_samples, cfg.micro_batch_size, dp_rank,
                                      dp_size)
    # A private generator: creating the iterator draws a base seed from it, not from torch's
    # global RNG, whose state is checkpointed (a resumed run creates its iterators after the
    # restore, an uninterrupted one before step 1: with the global RNG they would then differ).
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed))
