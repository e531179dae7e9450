"""Data: corpora, tokenizer, cached token shards and the resumable data-parallel loader.

``prepare_data(cfg)`` is the one call the trainer needs; it returns the tokenizer and the train
and validation token arrays (memory-mapped views). ``TokenLoader`` turns a token array into
(x, y) batches. Preparation streams the corpus (``kiln.data.prepare``) in bounded memory.
The loader (which needs torch) is imported on first use, so preparing data never loads torch.
"""

from kiln.data.corpus import Corpus, Document, load_documents
from kiln.data.dataset import PreparedData, prepare_data
from kiln.data.shards import TokenView
from kiln.data.tokenizer import EOS, Tokenizer, build_tokenizer

__all__ = [
    "EOS",
    "Corpus",
    "Document",
    "PreparedData",
    "TokenLoader",
    "TokenView",
    "Tokenizer",
    "build_tokenizer",
    "load_documents",
    "prepare_data",
    "val_batches",
]


def __getattr__(name: str):
    if name in ("TokenLoader", "val_batches"):
        from kiln.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'kiln.data' has no attribute {name!r}")
