"""Models: the encoder-only denoiser and the causal AR baseline share one transformer; ExLM
(mdlm.models.exlm) runs it over [MASK]s expanded into states."""

from __future__ import annotations

from flax import nnx

from mdlm.config import ModelConfig
from mdlm.models.presets import count_params, flops_per_token
from mdlm.models.exlm import ExLM
from mdlm.models.transformer import Transformer


def build(cfg: ModelConfig, *, seed: int = 0, vocab_size: int | None = None) -> Transformer:
  """Builds a model (kind "denoiser" or "ar") with parameters initialised from `seed`; with
  cfg.exlm_states > 0, ExLM's expanded-state denoiser over a Transformer (mdlm.models.exlm)."""
  if vocab_size is not None:
    cfg = cfg.replace(vocab_size=vocab_size)
  if cfg.exlm_states > 0:
    return ExLM(cfg.validate(), rngs=nnx.Rngs(params=seed))
  return Transformer(cfg.validate(), rngs=nnx.Rngs(params=seed))


__all__ = ["ExLM", "ModelConfig", "Transformer", "build", "count_params", "flops_per_token"]
