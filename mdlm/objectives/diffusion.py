"""objective=diffusion: the masked-LM family, of which MDLM's NELBO is the default member.

"A weighted mixture of masked-LM losses across sampled mask ratios": a forward process corrupts
some tokens of x0 (`masking.ratio`: how many, `masking.content`: which, `masking.corruption`: into
what; mdlm.masking), a bidirectional denoiser predicts the original token at each corrupted
(scored) position S_b of sequence b, and the cross-entropies CE_i = -log p_theta(x0_i | xt)
(mask logit removed) are weighted (`masking.weighting`):

  elbo         sum_i w_b CE_i per sequence, over the real tokens of the batch: the NELBO per
               token (mdlm.diffusion). w_b = (1 - t_min) w(t_b) for t ~ U[t_min, 1), or
               w(t_b) / q(t_b) for t ~ q (ratio=importance), w(t) = -alpha'(t) / (1 - alpha(t)).
  mean_masked  (1 / |S_b|) sum_{i in S_b} CE_i, averaged over the sequences with |S_b| > 0.
  sum_masked   sum_b sum_{i in S_b} CE_i / sum_b |S_b| (BERT's loss: the mean over the batch's
               scored tokens).

The default settings (ratio=schedule, content=random, corruption=mask, weighting=elbo) give
exactly MDLM's Rao-Blackwellized objective. A time-conditioned denoiser sees the mask probability
1 - alpha(t), or, for ratios that are not drawn through t, the fraction of real tokens scored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mdlm import config as config_lib
from mdlm import diffusion, masking
from mdlm.diffusion import LossTerms
from mdlm.objectives.base import (Objective, Setup, real_token_count, refuse_labelled_data,
                                  register)


@dataclasses.dataclass
class DiffusionConfig(config_lib.ObjectiveConfig):
  """The masked family's settings are the `masking` and `noise` sections (shared with training
  phases); nothing of its own here."""

  name: str = "diffusion"
  model_kind = "denoiser"
  uses_masking = True

  def check(self, cfg: config_lib.Config) -> None:
    config_lib._check(cfg.model.kind == "denoiser",
                      "objective=diffusion trains a bidirectional model: set model.kind=denoiser "
                      "(or train an AR model with objective=ar)")
    refuse_labelled_data(cfg, self.name)


@register
class Diffusion(Objective):
  """See the module docstring."""

  name = "diffusion"
  settings_class = DiffusionConfig
  causal = False
  measures = ("nelbo", "pll", "masked")

  @classmethod
  def needs_token_classes(cls, settings, cfg) -> bool:
    return cfg.masking.content == "weighted"

  def __init__(self, settings: DiffusionConfig, setup: Setup):
    super().__init__(settings, setup)
    self.masking = setup.masking
    m = self.masking
    self.time_drawn = m.ratio in ("schedule", "importance")
    if m.corruption == "bert":
      specials = set(setup.special_ids) | {setup.mask_id}
      self.replacement_ids = np.asarray(
          [i for i in range(setup.vocab_size) if i not in specials], np.int32)
    if m.content == "weighted":
      if setup.token_classes is None:
        raise ValueError("masking.content=weighted needs the token classes (Setup.token_classes).")
      self.token_classes = jnp.asarray(setup.token_classes, jnp.int32)
      self.num_classes = int(np.max(setup.token_classes)) + 1

  # ----------------------------------------------------------------------------- state

  def init_state(self):
    m, state = self.masking, {}
    if m.ratio == "importance" and m.proposal == "adaptive":
      state["times"] = masking.histogram_init(m.bins, m.history)
    if m.content == "weighted":
      state["class_loss"] = jnp.zeros((self.num_classes,), jnp.float32)
    return state or None

  def update_state(self, state, batch, terms: LossTerms, aux):
    state = dict(state)
    if "times" in state:  # the uniform-t integrand of each row: its term times q(t) (1 - t_min)
      value_B = (terms.nll_sum_B * batch["q"] * (1.0 - self.setup.t_min)
                 / jnp.maximum(terms.num_tokens_B, 1.0))
      state["times"] = masking.histogram_record(state["times"], batch["bin"], value_B)
    if "class_loss" in state:
      state["class_loss"] = masking.update_class_loss(
          state["class_loss"], aux["ce_BxL"], batch["scored"],
          self.token_classes[batch["tokens"]], self.masking.class_loss_decay)
    return state

  # ----------------------------------------------------------------------------- the draw

  def draw(self, batch, key, step, state):
    key = jax.random.fold_in(key, 0)
    x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
    out = self._times(x0.shape[0], jax.random.fold_in(key, 0), state)
    if self.time_drawn and self.masking.content == "random":
      scored = masking.choose_bernoulli(jax.random.fold_in(key, 1),
                                        token_mask, self.setup.schedule.mask_prob(out["t"]))
    else:
      count_B = self._counts(jax.random.fold_in(key, 1), token_mask, step, out.get("t"))
      scored = self._choose(jax.random.fold_in(key, 2), x0, token_mask, count_B, state)
    out["xt"] = masking.corrupt(jax.random.fold_in(key, 3), x0, scored, self.setup.mask_id,
                                self.masking.corruption,
                                getattr(self, "replacement_ids", None))
    out["scored"] = scored
    return out

  def _times(self, batch_size, key, state) -> dict:
    """t and the per-row weight of the elbo weighting (and the proposal's bin and density)."""
    m, s = self.masking, self.setup
    if m.ratio == "schedule":
      return {"t": diffusion.sample_times(key, batch_size, t_min=s.t_min,
                                          antithetic=s.antithetic, num_steps=s.num_steps)}
    if m.ratio != "importance":
      return {}
    if m.proposal == "beta":
      t_B, q_B = masking.beta_times(key, batch_size, m.beta_a, m.beta_b, t_min=s.t_min,
                                    antithetic=s.antithetic)
      return {"t": t_B, "q": q_B}
    probs_K = masking.histogram_probs(state["times"], m.uniform_mix)
    t_B, q_B, bin_B = masking.histogram_times(key, batch_size, probs_K, t_min=s.t_min,
                                              antithetic=s.antithetic)
    return {"t": t_B, "q": q_B, "bin": bin_B}

  def _counts(self, key, token_mask_BxL, step, t_B):
    """How many tokens of each row are scored (the ratios drawn as counts)."""
    m, s = self.masking, self.setup
    n_B = jnp.sum(token_mask_BxL, axis=1)
    if m.ratio == "fixed":
      return masking.mask_count(n_B, m.p)
    if m.ratio == "uniform":
      return masking.uniform_counts(key, n_B, max_ratio=m.max_ratio, antithetic=s.antithetic)
    if m.ratio == "decay":
      return masking.mask_count(n_B, masking.decay_ratio(step, s.total_steps, m.p, m.decay))
    # A time-drawn ratio with non-random content: the count of MDLM's Bernoulli draw, Binomial.
    chosen = masking.choose_bernoulli(key, token_mask_BxL, s.schedule.mask_prob(t_B))
    return jnp.sum(chosen, axis=1)

  def _choose(self, key, x0_BxL, token_mask_BxL, count_B, state):
    m = self.masking
    if m.content == "span":
      return masking.choose_spans(key, token_mask_BxL, count_B, m.span_mean)
    if m.content == "weighted":
      weight_C = masking.class_weights(state["class_loss"])
      log_weight_BxL = jnp.log(weight_C)[self.token_classes[x0_BxL]]
      return masking.choose_weighted(key, token_mask_BxL, count_B, log_weight_BxL)
    return masking.choose_uniform(key, token_mask_BxL, count_B)

  # ----------------------------------------------------------------------------- the loss

  def row_weight(self, batch):
    """The elbo weight of each row: (1 - t_min) w(t) (or the discrete-time weight), or
    w(t) / q(t) for importance-sampled t."""
    s = self.setup
    if "q" in batch:
      return s.schedule.weight(batch["t"]) / batch["q"]
    return diffusion.time_weight(batch["t"], s.schedule, num_steps=s.num_steps, t_min=s.t_min)

  def noise_level(self, batch):
    if self.time_drawn:
      return self.setup.schedule.mask_prob(batch["t"])
    real_B = jnp.maximum(jnp.sum(batch["token_mask"], axis=1), 1)
    return jnp.sum(batch["scored"], axis=1) / real_B

  def loss(self, model, batch, key, *, dropout_key=None):
    del key  # the draw is in the batch
    x0, token_mask, scored = batch["tokens"], batch["token_mask"], batch["scored"]
    noise = self.noise_level(batch) if model.cfg.time_conditioning else None
    logits = model(batch["xt"], noise, token_mask_BxL=self.setup.attention_mask(batch),
                   dropout_key=dropout_key, causal=self.causal)
    ce_BxL = diffusion.masked_cross_entropy(logits, x0, self.setup.mask_id)
    aux = {"ce_BxL": ce_BxL} if self.masking.content == "weighted" else {}
    weighting = self.masking.weighting
    if weighting == "elbo":
      # where() rather than multiply: an unscored position contributes exactly 0.
      per_token = jnp.where(scored, self.row_weight(batch)[:, None] * ce_BxL, 0.0)
      return diffusion.loss_terms(per_token, token_mask, scored), aux
    sum_B = jnp.sum(jnp.where(scored, ce_BxL, 0.0), axis=-1)
    count_B = jnp.sum(scored, axis=-1).astype(jnp.float32)
    if weighting == "sum_masked":
      return LossTerms(sum_B, count_B, count_B), aux
    has_B = (count_B > 0).astype(jnp.float32)  # mean_masked: one unit per scored sequence
    return LossTerms(sum_B / jnp.maximum(count_B, 1.0), has_B, count_B), aux

  def denominator(self, batch):
    weighting = self.masking.weighting
    if weighting == "elbo":
      return real_token_count(batch)
    count_B = jnp.sum(batch["scored"], axis=-1)
    if weighting == "sum_masked":
      return jnp.sum(count_B).astype(jnp.float32)
    return jnp.sum(count_B > 0).astype(jnp.float32)
