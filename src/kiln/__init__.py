"""Kiln: train GPT-family language models compute-optimally, sparsely and in parallel."""

__version__ = "0.1.0"
