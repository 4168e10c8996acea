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

import optax

from mdlm import config as config_lib
from mdlm import diffusion
from mdlm.models import hybrid
from mdlm.objectives.base import Objective, refuse_labelled_data, register


@dataclasses.dataclass
class MariaConfig(config_lib.ObjectiveConfig):
  """denoiser_run / ar_run: the trained run directories of the two backbones (one tokenizer)."""

  name: str = "maria"
  in_phases = False   # its model is a head over two given runs, not the model phases train
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
    refuse_labelled_data(cfg, self.name)


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
    return freeze_backbones(tx, params)

  def draw(self, batch, key, step, state):
    s = self.setup
    xt_BxL, noise_B = maria_corrupt(
        jax.random.fold_in(key, 0), batch["tokens"], batch.get("token_mask"), mask_id=s.mask_id,
        schedule=s.schedule, t_min=s.t_min, antithetic=s.antithetic)
    return {"xt": xt_BxL, "noise": noise_B}

  def loss(self, model, batch, key, *, dropout_key=None):
    del dropout_key  # the backbones run without dropout
    s = self.setup
    return maria_loss(model, batch, key, schedule=s.schedule, t_min=s.t_min,
                             antithetic=s.antithetic), {}

  def denominator(self, batch):
    masked = (jnp.asarray(batch["xt"]) == self.setup.mask_id) & jnp.asarray(batch["token_mask"],
                                                                            bool)
    return jnp.sum(masked).astype(jnp.float32)


def freeze_backbones(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
  """`tx` on W alone; the backbones get exact zero updates and no optimizer state.

  params: the head's parameters as a pure dict {"ar": ..., "denoiser": ..., "w": ...} (the
  trainer's layout); the labels are computed from it once, so the transformation also works with
  optax.tree_map_params.
  """
  labels = {k: jax.tree.map(lambda _, k=k: "train" if k == "w" else "frozen", v)
            for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def masked_token_scores(logits_BxLxV, x0_BxL, counted_BxL):
  """Per sequence: (nll_B, correct_B, count_B) over the counted positions, where nll sums
  -log softmax(logits)[x0] and correct counts argmax == x0. float32."""
  counted = jnp.asarray(counted_BxL, bool)
  ce_BxL = diffusion.cross_entropy(logits_BxLxV, x0_BxL)  # the head has no mask output
  nll_B = jnp.sum(jnp.where(counted, ce_BxL, 0.0), axis=-1)
  correct_B = jnp.sum(counted & (jnp.argmax(logits_BxLxV, -1) == x0_BxL), axis=-1)
  return nll_B, correct_B.astype(jnp.float32), jnp.sum(counted, axis=-1).astype(jnp.float32)


def maria_corrupt(key, x0_BxL, token_mask_BxL=None, *, mask_id: int, schedule,
                  t_min: float = diffusion.T_MIN, antithetic: bool = True,
                  ratio: float | None = None):
  """MARIA's masking draw: (xt_BxL, noise_B). Every real token is masked independently with
  probability noise_B = schedule.mask_prob(t), t ~ U[t_min, 1) stratified over the batch (or
  the fixed `ratio`)."""
  x0_BxL = jnp.asarray(x0_BxL)
  time_key, mask_key = jax.random.split(key)
  batch_size = x0_BxL.shape[0]
  if ratio is None:
    t_B = diffusion.sample_times(time_key, batch_size, t_min=t_min, antithetic=antithetic)
    noise_B = schedule.mask_prob(t_B)
  else:
    noise_B = jnp.full((batch_size,), ratio, jnp.float32)
  move_BxL = jax.random.uniform(mask_key, x0_BxL.shape) < noise_B[:, None]
  if token_mask_BxL is not None:
    move_BxL = move_BxL & jnp.asarray(token_mask_BxL, bool)
  return jnp.where(move_BxL, jnp.asarray(mask_id, x0_BxL.dtype), x0_BxL), noise_B


def maria_loss(head: hybrid.MariaHead, batch, key, *, schedule, t_min: float = diffusion.T_MIN,
               antithetic: bool = True, ratio: float | None = None) -> diffusion.LossTerms:
  """One MARIA training draw, as per-sequence diffusion.LossTerms.

  The masked input is batch["xt"] with noise level batch["noise"] when given (the trainer draws
  them over the whole global batch, so it knows the masked-token count before micro-batching);
  otherwise `maria_corrupt` draws them with `key`. nll_sum_B sums the head's cross-entropy over
  the masked positions of each sequence, and num_tokens_B = num_masked_B counts them:
  sum(nll_sum_B) / sum(num_tokens_B) is the mean cross-entropy per masked token.
  """
  x0_BxL = jnp.asarray(batch["tokens"])
  token_mask_BxL = batch.get("token_mask")
  if "xt" in batch:
    xt_BxL, noise_B = jnp.asarray(batch["xt"]), jnp.asarray(batch["noise"])
  else:
    xt_BxL, noise_B = maria_corrupt(key, x0_BxL, token_mask_BxL, mask_id=head.mask_id,
                                    schedule=schedule, t_min=t_min, antithetic=antithetic,
                                    ratio=ratio)
  move_BxL = xt_BxL == head.mask_id
  if token_mask_BxL is not None:
    move_BxL = move_BxL & jnp.asarray(token_mask_BxL, bool)
  logits = head(x0_BxL, xt_BxL, noise_level_B=noise_B, token_mask_BxL=token_mask_BxL)
  nll_B, _, count_B = masked_token_scores(logits, x0_BxL, move_BxL)
  return diffusion.LossTerms(nll_B, count_B, count_B)
