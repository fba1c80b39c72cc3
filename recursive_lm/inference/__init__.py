"""Inference: autoregressive decoding with the model's KV cache, and the serving engine."""

from recursive_lm.checkpoint import load_model as load_checkpoint  # the one loader, under its old name here
from recursive_lm.inference.decode import generate
from recursive_lm.inference.sampling import sample_rows
from recursive_lm.inference.engine import Completion, Engine

__all__ = ["Completion", "Engine", "generate", "load_checkpoint", "sample_rows"]
