"""Data pipeline: tokenizers, preprocessing into Megatron indexed datasets, the demo corpus.

Exports are resolved lazily (PEP 562) so that spawned tokenizer workers and CLI error paths do
not pay for importing ``megatron.core`` (several seconds).
"""

from importlib import import_module

_EXPORTS = {
    "DataError": "errors",
    "Tokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "PreprocessConfig": "preprocess",
    "PreprocessJob": "preprocess",
    "DatasetInfo": "preprocess",
    "preprocess": "preprocess",
    "preprocess_files": "preprocess",
    "load_indexed_dataset": "indexed",
    "check_indexed_files": "indexed",
    "read_sidecar": "indexed",
    "CorpusConfig": "corpus",
    "build_demo_corpus": "corpus",
    "split_documents": "corpus",
    "DemoData": "demo",
    "prepare_demo_data": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
