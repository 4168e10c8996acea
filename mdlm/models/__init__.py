"""Models: the encoder-only denoiser and the causal AR baseline share one transformer."""

from __future__ import annotations

from flax import nnx

from mdlm.config import ModelConfig
from mdlm.models.presets import count_params, flops_per_token
from mdlm.models.transformer import Transformer


def build(cfg: ModelConfig, *, seed: int = 0, vocab_size: int | None = None) -> Transformer:
  """Builds a model (kind "denoiser" or "ar") with parameters initialised from `seed`."""
  if vocab_size is not None:
    cfg = cfg.replace(vocab_size=vocab_size)
  return Transformer(cfg.validate(), rngs=nnx.Rngs(params=seed))


__all__ = ["ModelConfig", "Transformer", "build", "count_params", "flops_per_token"]
