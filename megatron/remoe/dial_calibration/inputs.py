"""What the dial is applied to and measured on: the model (a Megatron checkpoint or an HF folder,
fp32, undialled) and the held-out tokens (the demo corpus, text files, tokenized prefixes or the
run's own validation data)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron.remoe import analysis as A
from megatron.remoe import evaluation as ev
from megatron.remoe.analysis import EvalTokens
from megatron.remoe.data.tokenizer import load_tokenizer
from megatron.remoe.hf.configs import transformer_config_from_hf
from megatron.remoe.hf.folders import load_hf_folder
from megatron.remoe.hf.to_hf import load_megatron_checkpoint
from megatron.remoe.hf.to_megatron import hf_to_megatron
from megatron.remoe.logs import get_logger
from megatron.remoe.router import set_dial

logger = get_logger(__name__)


class DialUsageError(ValueError):
    """Bad command-line input; one line, exit 2."""


@dataclass
class LoadedModel:
    model: object
    tcfg: object
    router: str  # relu | topk | ...
    seq_length: int
    vocab_size: int
    tokenizer: object
    source: str
    train_config: object = None  # TrainConfig of a Megatron checkpoint (None for HF folders)


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(path: str, tokenizer: Optional[str] = None,
               overrides: Optional[dict] = None) -> LoadedModel:
    """A Megatron checkpoint (converter's loader) or an HF folder (hf_to_megatron), fp32, eval,
    undialled."""
    if is_hf_folder(path):
        hf, _ = load_hf_folder(path, torch.float32)
        if overrides and "moe_router_topk" in overrides:
            hf.config.num_experts_per_tok = overrides["moe_router_topk"]
        tcfg = transformer_config_from_hf(hf.config, moe_relu_dial=None)
        model, tcfg = hf_to_megatron(hf, tcfg)

        tok = load_tokenizer(tokenizer or path) if (
            tokenizer or os.path.isfile(os.path.join(path, "tokenizer.json"))) else None
        router = "relu" if tcfg.moe_relu_routing else ("topk" if tcfg.num_moe_experts else "dense")
        logger.info(f"dial: loaded HF folder {path} ({router}, {tcfg.num_layers} layers)")
        return LoadedModel(model, tcfg, router, hf.config.max_position_embeddings,
                           hf.config.vocab_size, tok, os.path.abspath(path))
    model, tcfg, cfg, info = load_megatron_checkpoint(path, tokenizer=tokenizer, overrides=overrides)
    if cfg.router == "relu":
        set_dial(model, None)
    return LoadedModel(model, tcfg, cfg.router, cfg.seq_length, info["vocab_size"],
                       info["tokenizer"], info["checkpoint"], cfg)


def eval_tokens_from_texts(domain_docs: dict, tokenizer, tokens_per_domain: int,
                           seq_length: int):
    """analysis.EvalTokens from {domain: [documents]}: each document's tokens plus the
    end-of-document token, the first `tokens_per_domain` per domain, cut into windows."""
    names, seqs, seq_dom = [], [], []
    for d, (name, docs) in enumerate(sorted(domain_docs.items())):
        stream: list = []
        for doc in docs:
            if len(stream) >= tokens_per_domain:
                break
            stream += tokenizer.encode(doc) + [tokenizer.eod]
        stream = np.asarray(stream[:tokens_per_domain], dtype=np.int64)
        if len(stream) < 2:
            continue
        names.append(name)
        for start in range(0, len(stream), seq_length):
            if len(stream) - start >= 2:
                seqs.append(stream[start:start + seq_length])
                seq_dom.append(len(names) - 1)
    if not seqs:
        raise DialUsageError("the held-out text is empty")
    return EvalTokens(names, seqs, seq_dom, seq_length)


def held_out_tokens(args, lm: LoadedModel):
    """The evaluation tokens named on the command line (or the run's own validation prefixes)."""
    seq = args.seq_length or lm.seq_length
    texts = _pairs(args.text, "--text")
    prefixes = _pairs(args.data, "--data")
    if (args.demo_corpus or texts) and lm.tokenizer is None:
        raise DialUsageError("the model has no tokenizer to encode text with; pass --tokenizer")
    domain_docs: dict = {}
    try:
        if args.demo_corpus:
            domain_docs.update(ev.demo_corpus_texts(args.demo_corpus, args.split))
        for domain, files in texts.items():
            domain_docs[domain] = [d for f in files for d in ev.read_text_file(f)]
    except ev.EvaluationError as e:
        raise DialUsageError(str(e)) from None
    if domain_docs:
        if prefixes:
            raise DialUsageError("give text (--demo-corpus / --text) or --data prefixes, not both")
        return eval_tokens_from_texts(domain_docs, lm.tokenizer, args.tokens_per_domain, seq)
    if not prefixes:
        if lm.train_config is None:
            raise DialUsageError("an HF folder has no run data: pass --demo-corpus DIR, --text "
                                 "DOMAIN=FILE or --data DOMAIN=PREFIX")
        prefixes, _ = A.default_data(lm.train_config, args.split)
    else:
        prefixes = {d: p[0] for d, p in prefixes.items()}
    return A.make_eval_tokens(prefixes, args.tokens_per_domain, seq, lm.tokenizer)


def _pairs(items, flag) -> dict:
    out: dict = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise DialUsageError(f"{flag} {item!r}: expected DOMAIN=PATH")
        out.setdefault(name, []).append(value)
    return out

