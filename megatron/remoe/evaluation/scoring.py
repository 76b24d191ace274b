"""The model side: an exported HF causal LM and its tokenizer, scoring text in batches and
tallying the experts each token was routed to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import tokenizers
import torch
import torch.nn.functional as F

from megatron.remoe.evaluation.tasks import EvaluationError


@dataclass
class RoutingTally:
    """Active (token, expert) pairs per MoE layer over the real tokens seen."""

    active: list = field(default_factory=list)
    tokens: int = 0
    zero_tokens: list = field(default_factory=list)
    num_experts: int = 0

    def add(self, maps: Sequence[torch.Tensor], valid: torch.Tensor) -> None:
        valid = valid.reshape(-1)
        if not self.active:
            self.active = [0] * len(maps)
            self.zero_tokens = [0] * len(maps)
            self.num_experts = int(maps[0].shape[-1]) if maps else 0
        for i, m in enumerate(maps):
            m = m.reshape(-1, m.shape[-1])[valid]
            per_token = m.sum(-1)
            self.active[i] += int(per_token.sum())
            self.zero_tokens[i] += int((per_token == 0).sum())
        self.tokens += int(valid.sum())

    def summary(self) -> dict:
        if not self.active or not self.tokens:
            return {}
        per_layer = [a / self.tokens for a in self.active]
        return {"experts_per_token": sum(per_layer) / len(per_layer),
                "experts_per_token_per_layer": per_layer,
                "sparsity_per_layer": [1 - x / self.num_experts for x in per_layer],
                "zero_expert_token_fraction": sum(self.zero_tokens) /
                (self.tokens * len(self.active)),
                "routed_tokens": self.tokens}


class ScoringModel:
    """An HF causal LM plus its tokenizer (tokenizer.json of the folder), scoring text."""

    def __init__(self, model, tokenizer, eot_id: int, max_length: int, batch_size: int = 8,
                 name: str = "model"):
        self.model = model.eval()
        self.tok = tokenizer
        self.eot_id = int(eot_id)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.name = name
        self.device = next(model.parameters()).device
        cfg = model.config
        self.model_type = getattr(cfg, "model_type", "")
        self.is_moe = self.model_type in ("remoe", "mixtral") and (
            any(getattr(cfg, "moe_layers", [1])) if self.model_type == "remoe" else True)
        self.tallies: dict = {}
        self.forward_tokens = 0

    # -- tokenizer ----------------------------------------------------------------------------
    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- forward with routing capture ---------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tag: str):
        kwargs = {}
        if self.is_moe:
            kwargs["output_router_logits"] = True
        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(self.device),
                             attention_mask=attention_mask.to(self.device), use_cache=False,
                             **kwargs)
        self.forward_tokens += int(attention_mask.sum())
        if self.is_moe:
            maps = getattr(out, "routing_maps", None)
            if maps is None and getattr(out, "router_logits", None) is not None:
                k = self.model.config.num_experts_per_tok
                maps = [torch.zeros_like(lg, dtype=torch.bool).scatter(
                    1, lg.float().reshape(-1, lg.shape[-1]).topk(k, -1).indices, True)
                    for lg in (x.reshape(-1, x.shape[-1]) for x in out.router_logits)]
            if maps:
                self.tallies.setdefault(tag, RoutingTally()).add(maps, attention_mask.bool())
        return out.logits.float()

    def score(self, pairs: Sequence[tuple], tag: str = "") -> list:
        """[(context_ids, continuation_ids)] -> [(sum log p(continuation | context), greedy)].
        Inputs longer than max_length are cut from the left. Right padding."""
        results = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                ctx, cont = list(pairs[i][0]), list(pairs[i][1])
                if not cont:
                    raise EvaluationError("empty continuation")
                if not ctx:
                    ctx = [self.eot_id]
                full = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(full[:-1])
                conts.append(min(len(cont), len(full) - 1))
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), self.eot_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logp = F.log_softmax(self._forward(ids, mask, tag), dim=-1)
            for r, i in enumerate(idx):
                n, c = len(seqs[r]), conts[r]
                target = torch.tensor(list(pairs[i][1])[len(pairs[i][1]) - c:])
                lp = logp[r, n - c:n]  # predictions of the last c inputs' next tokens
                tok_lp = lp.gather(1, target[:, None]).squeeze(1)
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (float(tok_lp.sum()), greedy)
        return results

    def rolling_loglikelihood(self, texts: Sequence[str], tag: str = "") -> list:
        """Sum of log p over all tokens of each text (disjoint windows of max_length)."""
        pairs, owner = [], []
        for t_i, text in enumerate(texts):
            tokens = self.encode(text)
            ids = [self.eot_id] + tokens
            pos = 0
            while pos < len(tokens):
                end = min(pos + self.max_length, len(tokens))
                s = max(0, end - self.max_length)  # window ids[s:end] predicts tokens[s..end-1]
                ctx = ids[s:pos + 1]
                cont = tokens[pos:end]
                pairs.append((ctx, cont))
                owner.append(t_i)
                pos = end
        scored = self.score(pairs, tag)
        out = [0.0] * len(texts)
        for t_i, (lp, _) in zip(owner, scored):
            out[t_i] += lp
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple:
        """lm-eval's split: trailing spaces of the context move to the continuation, then the
        continuation's ids are what encode(context + continuation) adds after encode(context)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def generate(self, context: str, until: Sequence[str], max_new_tokens: int,
                 tag: str = "") -> str:
        ids = self.encode(context)[-(self.max_length - 1):] or [self.eot_id]
        new = []
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new][-self.max_length:])
            logits = self._forward(x, torch.ones_like(x), tag)
            nxt = int(logits[0, -1].argmax())
            if nxt == self.eot_id:
                break
            new.append(nxt)
            text = self.decode(new)
            if any(u and u in text for u in until):
                break
        text = self.decode(new)
        for u in until:
            if u and u in text:
                text = text.split(u)[0]
        return text


def load_scoring_model(model_dir: str, dtype: str = "fp32", batch_size: int = 8,
                       max_length: Optional[int] = None, device: str = "cpu") -> ScoringModel:
    """The exported folder (ReMoE through trust_remote_code) and its tokenizer.json."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 -- optional extra (eval)

    tok_file = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise EvaluationError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if not os.path.isfile(tok_file):
        raise EvaluationError(f"{model_dir} has no tokenizer.json; export with a tokenizer "
                              "(convert_checkpoint.py --tokenizer ...)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                         dtype=torch_dtype)
        except TypeError:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                         torch_dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"cannot load {model_dir}: {' '.join(str(e).split())[:300]}") \
            from None
    model.to(device)
    tok = tokenizers.Tokenizer.from_file(tok_file)
    tok.encode_special_tokens = True  # document text never produces the eod token
    eot = config.eos_token_id
    if isinstance(eot, list):
        eot = eot[0]
    if eot is None:
        raise EvaluationError(f"{model_dir}/config.json has no eos_token_id")
    return ScoringModel(model, tok, eot, max_length or config.max_position_embeddings,
                        batch_size, name=os.path.basename(os.path.normpath(model_dir)))
