"""Data: corpora, tokenizer, cached token shards and the resumable data-parallel loader.

``prepare_data(cfg)`` is the one call the trainer needs; it returns the tokenizer and the train
and validation token arrays. ``TokenLoader`` turns a token array into (x, y) batches.
"""

from kiln.data.corpus import Document, load_documents
from kiln.data.loader import TokenLoader, val_batches
from kiln.data.shards import PreparedData, prepare_data
from kiln.data.tokenizer import EOS, Tokenizer, build_tokenizer

__all__ = [
    "EOS",
    "Document",
    "PreparedData",
    "TokenLoader",
    "Tokenizer",
    "build_tokenizer",
    "load_documents",
    "prepare_data",
    "val_batches",
]
