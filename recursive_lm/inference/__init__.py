"""Inference: autoregressive decoding with the model's KV cache."""

from recursive_lm.inference.decode import generate, load_checkpoint, sample_logits

__all__ = ["generate", "load_checkpoint", "sample_logits"]
