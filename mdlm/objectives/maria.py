"""objective=maria: train only the linear MARIA head over a frozen denoiser and a frozen AR model.

Israel et al. 2025, "Enabling Autoregressive Models to Fill In Masked Tokens" (mdlm.models.hybrid
holds the head). The masks are drawn over the global batch (each real token masked with
probability 1 - alpha(t), t stratified), so the trainer knows the masked-token count before
micro-batching; the loss is the head's cross-entropy per masked token.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp

from mdlm import config as config_lib
from mdlm.models import hybrid
from mdlm.objectives.base import Objective, register


@dataclasses.dataclass
class MariaConfig(config_lib.ObjectiveConfig):
  """denoiser_run / ar_run: the trained run directories of the two backbones (one tokenizer)."""

  name: str = "maria"
  denoiser_run: Optional[str] = None
  ar_run: Optional[str] = None

  def check(self, cfg: config_lib.Config) -> None:
    for key, what in (("denoiser_run", "denoiser"), ("ar_run", "AR model")):
      path = getattr(self, key)
      config_lib._check(bool(path) and path != "???",
                        f"objective=maria needs objective.{key}: the run directory of a trained "
                        f"{what} (both backbones share one tokenizer)")
      config_lib._check(os.path.isdir(path), f"objective.{key}={path} is not a directory")
    # MARIA's parameters are its two backbone runs plus a fresh head: nothing to copy in.
    config_lib._check(cfg.train.init_from is None,
                      "train.init_from does not apply to objective=maria (its backbones come from "
                      "objective.denoiser_run and objective.ar_run); drop train.init_from")
    config_lib._check(not cfg.data.meap_sft,
                      "data.meap_sft=true trains with objective=ar; drop it for objective=maria")


@register
class Maria(Objective):
  """See the module docstring."""

  name = "maria"
  settings_class = MariaConfig
  causal = False
  measures = ("maria",)

  @classmethod
  def given_runs(cls, settings: MariaConfig) -> dict[str, str]:
    return {"denoiser": settings.denoiser_run, "ar": settings.ar_run}

  @classmethod
  def given_model(cls, settings: MariaConfig, runs: dict):
    den, ar = runs["denoiser"], runs["ar"]
    if den.tokenizer.fingerprint != ar.tokenizer.fingerprint:
      raise ValueError(f"{den.run_dir} and {ar.run_dir} use different tokenizers; MARIA needs one "
                       "shared tokenizer (train both runs with the same tokenizer settings).")
    return hybrid.build_maria(den.model, ar.model), den.tokenizer

  @classmethod
  def wrap_optimizer(cls, tx, params):
    return hybrid.freeze_backbones(tx, params)

  def draw(self, batch, key, step, state):
    s = self.setup
    xt_BxL, noise_B = hybrid.maria_corrupt(
        jax.random.fold_in(key, 0), batch["tokens"], batch.get("token_mask"), mask_id=s.mask_id,
        schedule=s.schedule, t_min=s.t_min, antithetic=s.antithetic)
    return {"xt": xt_BxL, "noise": noise_B}

  def loss(self, model, batch, key, *, dropout_key=None):
    del dropout_key  # the backbones run without dropout
    s = self.setup
    return hybrid.maria_loss(model, batch, key, schedule=s.schedule, t_min=s.t_min,
                             antithetic=s.antithetic), {}

  def denominator(self, batch):
    masked = (jnp.asarray(batch["xt"]) == self.setup.mask_id) & jnp.asarray(batch["token_mask"],
                                                                            bool)
    return jnp.sum(masked).astype(jnp.float32)

