"""Models: the plain GPT, its named shapes, and sampling."""

from kiln.models.generate import generate
from kiln.models.gpt import GPT, GPTConfig, KVCache, cross_entropy
from kiln.models.presets import PRESETS, resolve_model

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "cross_entropy", "generate", "resolve_model"]
