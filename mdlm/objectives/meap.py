"""objective=meap: next-token training with a fraction of the *inputs* masked (mdlm.meap).

Zhuang et al. 2025, "Mask-Enhanced Autoregressive Prediction": a fresh pattern per sequence masks
exactly round(ratio x eligible) input positions (never BOS, padding or the last position); the
targets stay the clean next tokens; attention stays causal; inference is an ordinary AR model.
The pattern is drawn over the global batch, before micro-batching.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mdlm import config as config_lib
from mdlm import diffusion, meap
from mdlm.diffusion import LossTerms
from mdlm.objectives.ar import check_causal_kind, next_token_count
from mdlm.objectives.base import Objective, refuse_labelled_data, register


@dataclasses.dataclass
class MEAPConfig(config_lib.ObjectiveConfig):
  """ratio: the fraction of eligible input tokens masked (paper: 0.15 for pretraining)."""

  name: str = "meap"
  ratio: float = 0.15

  def check(self, cfg: config_lib.Config) -> None:
    check_causal_kind(cfg, self.name)
    config_lib._check(0.0 < self.ratio < 1.0, f"objective.ratio={self.ratio} must lie in (0, 1)")
    refuse_labelled_data(cfg, self.name)


@register
class MEAP(Objective):
  """See the module docstring."""

  name = "meap"
  settings_class = MEAPConfig
  causal = True
  measures = ("ar",)

  def draw(self, batch, key, step, state):
    if "labels" in batch:
      raise ValueError("objective=meap masks the inputs itself and ignores labels; MEAP-SFT "
                       "batches (data.meap_sft=true) train with objective=ar.")
    bos_id = self.setup.bos_id if self.setup.bos_id >= 0 else None
    inputs_BxL, masked_BxL = meap.meap_mask(
        jax.random.fold_in(key, 1), batch["tokens"], batch["token_mask"],
        ratio=self.settings.ratio, mask_id=self.setup.mask_id, bos_id=bos_id)
    return {"inputs": inputs_BxL, "masked": masked_BxL}

  def loss(self, model, batch, key, *, dropout_key=None):
    del key
    tokens_BxL, token_mask_BxL = batch["tokens"], batch["token_mask"]
    logits = model(batch["inputs"], token_mask_BxL=self.setup.attention_mask(batch),
                   dropout_key=dropout_key, causal=self.causal)
    # ar_nll reads the targets from its second argument: the clean tokens, not the inputs.
    nll_BxLm1 = diffusion.ar_nll(logits, tokens_BxL, token_mask_BxL)
    counted_B = jnp.sum(jnp.asarray(token_mask_BxL, bool)[:, 1:], axis=-1).astype(jnp.float32)
    return LossTerms(jnp.sum(nll_BxLm1, axis=-1), counted_B,
                     jnp.sum(batch["masked"], axis=-1).astype(jnp.float32)), {}

  def denominator(self, batch):
    return next_token_count(batch)
