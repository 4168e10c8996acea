"""objective=ar: exact next-token NLL of a causal model (the autoregressive baseline).

Position i predicts token i + 1, so a window of L tokens has L - 1 targets. With labelled batches
(data.meap_sft: MEAP fine-tuning examples, mdlm.data.sft) only the labelled positions are scored,
from the inputs as given (masked copies included): mdlm.meap.sft_terms.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mdlm import config as config_lib
from mdlm import diffusion, meap
from mdlm.diffusion import LossTerms
from mdlm.objectives.base import Objective, register


def next_token_count(batch):
  """Real next-token targets of a batch (labels for MEAP-SFT batches): float32 scalar."""
  if "labels" in batch:
    return meap.num_labels(batch["labels"])
  return jnp.sum(jnp.asarray(batch["token_mask"], bool)[:, 1:]).astype(jnp.float32)


def check_causal_kind(cfg: config_lib.Config, name: str) -> None:
  config_lib._check(cfg.model.kind == "ar",
                    f"objective={name} trains a causal model: set model.kind=ar (e.g. model=ar), "
                    "or use train.phases to train one model under both attentions")


@dataclasses.dataclass
class ARConfig(config_lib.ObjectiveConfig):
  name: str = "ar"
  model_kind = "ar"

  def check(self, cfg: config_lib.Config) -> None:
    check_causal_kind(cfg, self.name)


@register
class AR(Objective):
  """See the module docstring."""

  name = "ar"
  settings_class = ARConfig
  causal = True
  measures = ("ar",)

  def loss(self, model, batch, key, *, dropout_key=None):
    del key
    attention_mask = self.setup.attention_mask(batch)
    if "labels" in batch:
      return meap.sft_terms(model, batch, attention_mask_BxL=attention_mask,
                            dropout_key=dropout_key), {}
    x, token_mask = batch["tokens"], batch["token_mask"]
    logits = model(x, token_mask_BxL=attention_mask, dropout_key=dropout_key, causal=self.causal)
    nll = diffusion.ar_nll(logits, x, token_mask)
    counted = token_mask[:, 1:]
    return LossTerms(nll.sum(-1), counted.sum(-1).astype(jnp.float32),
                     counted.sum(-1).astype(jnp.float32)), {}

  def denominator(self, batch):
    return next_token_count(batch)
