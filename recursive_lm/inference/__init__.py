"""Inference: autoregressive decoding with the model's KV cache, and the serving engine."""

from recursive_lm.inference.decode import generate, load_checkpoint, sample_logits
from recursive_lm.inference.engine import Completion, Engine

__all__ = ["Completion", "Engine", "generate", "load_checkpoint", "sample_logits"]
