"""objective=exlm: ExLM's states-alignment loss over [MASK]s expanded into k states.

Zheng, Yang, Liang, Feng, Liu, Ju, Xiao and Zhang 2025, "ExLM: Rethinking the Impact of [MASK]
Tokens in Masked Language Models"; the dynamic program is DA-Transformer's (Huang et al. 2022,
"Directed Acyclic Transformer for Non-Autoregressive Machine Translation"). The model, its
expanded input, transitions and readout are mdlm.models.exlm (model.exlm_states = k,
model.exlm_links); this module draws the masks and scores them.

The draw is BERT's at a fixed ratio, as plain MLM (`masking.ratio=fixed`, `masking.p`; the
released training command masks 15%, [MASK] only): exactly round(p n) of the n real tokens of a
row become [MASK] (`masking.content` random or span), so ExLM and plain MLM at one ratio see the
same corruption. The bound on [MASK]s per row that the expansion needs is round(p L), static.
The loss of a row is -log P(Y | xt), Y its masked tokens in order, summed by the DAG's forward
recursion (`mdlm.models.exlm.dag_log_likelihood`); `masking.weighting` divides as for MLM:
sum_masked by the batch's [MASK]s (BERT's mean per masked token), mean_masked per row (the
released code: each row's loss over its target length, averaged over rows). Equal with full
rows, where every row has round(p L) [MASK]s.

Measures: exlm15/40/80 (`joint_terms`, the joint NLL above at the masks of the `masked`
measures, normalised by the paths' mass Z) and, through the model's per-position readout, the
masked-token NLL, NELBO and PLL of any denoiser.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mdlm import config as config_lib
from mdlm import masking
from mdlm.diffusion import LossTerms
from mdlm.models.exlm import NEG, dag_log_likelihood
from mdlm.objectives.base import Objective, refuse_labelled_data, register


@dataclasses.dataclass
class ExLMConfig(config_lib.ObjectiveConfig):
  """ExLM's settings are the model's (model.exlm_states, model.exlm_links) and the `masking`
  section's (a fixed ratio); nothing of its own here."""

  name: str = "exlm"
  uses_masking = True
  in_phases = False   # its model (expanded input, transition head) is not the phases' model
  expands_masks = True  # the objective that model.exlm_states > 0 trains with (config.validate)

  def check(self, cfg: config_lib.Config) -> None:
    m, k = cfg.masking, cfg.model.exlm_states
    config_lib._check(cfg.model.kind == "denoiser",
                      "objective=exlm trains a bidirectional denoiser (its [MASK] states attend "
                      "both ways); set model.kind=denoiser, not an AR model")
    config_lib._check(k >= 1, f"objective=exlm expands each [MASK] into k = model.exlm_states "
                      f"states and needs k >= 1 (the paper: 4); got {k}: set model.exlm_states=4 "
                      "(or experiment=exlm)")
    config_lib._check(m.ratio == "fixed",
                      f"objective=exlm masks a fixed ratio (the expansion needs a static bound "
                      f"on [MASK]s per row); masking.ratio={m.ratio!r}: set masking.ratio=fixed "
                      "masking.p=0.15")
    config_lib._check(m.corruption == "mask",
                      "objective=exlm expands [MASK] tokens; masking.corruption=bert leaves some "
                      "scored tokens unmasked: set masking.corruption=mask")
    config_lib._check(m.content in ("random", "span"),
                      f"objective=exlm draws random or span masks; masking.content={m.content!r} "
                      "is not supported: set masking.content=random")
    config_lib._check(masking.mask_count(cfg.data.seq_len, m.p) >= 1,
                      f"masking.p={m.p} masks round(p x {cfg.data.seq_len}) = 0 tokens of a "
                      "row: raise masking.p or data.seq_len")
    refuse_labelled_data(cfg, self.name)


def masked_targets(x0_BxL, masked_pos_BxM):
  """The masked tokens of each row in order [B, M]."""
  return jnp.take_along_axis(jnp.asarray(x0_BxL), masked_pos_BxM, axis=1)


def emissions(state_logits_BxNxV, targets_BxM):
  """log p(y_j | vertex u) for every target j and vertex u: [B, M, N]."""
  logp_BxNxV = jax.nn.log_softmax(jnp.asarray(state_logits_BxNxV, jnp.float32), axis=-1)
  n = logp_BxNxV.shape[1]
  idx_BxNxM = jnp.broadcast_to(targets_BxM[:, None, :], (targets_BxM.shape[0], n,
                                                        targets_BxM.shape[1]))
  return jnp.swapaxes(jnp.take_along_axis(logp_BxNxV, idx_BxNxM.astype(jnp.int32), axis=2), 1, 2)


def joint_log_likelihood(model, x0_BxL, scored_BxL, cap: int, noise_level_B=None, *,
                         token_mask_BxL=None, dropout_key=None, normalize: bool = False):
  """(log P(Y | xt) [B], [MASK] count [B]) with xt = x0 masked at scored_BxL (<= cap per row).
  normalize: divide by Z, the mass of the valid paths (1 with adjacent links), so that the
  figure is the log-likelihood of a distribution over V^m."""
  mask = jnp.asarray(model.mask_id, jnp.asarray(x0_BxL).dtype)
  xt_BxL = jnp.where(scored_BxL, mask, x0_BxL)
  lay, hidden = model.expanded_hidden(xt_BxL, scored_BxL, cap, noise_level_B,
                                      token_mask_BxL=token_mask_BxL, dropout_key=dropout_key)
  out = model.dag_outputs(lay, hidden, cap)
  emit = emissions(out.state_logits_BxNxV, masked_targets(x0_BxL, lay.masked_pos_BxM))
  valid_N = (jnp.arange(emit.shape[2]) // model.states)[None, :] < lay.count_B[:, None]
  emit = jnp.where(valid_N[:, None, :], emit, NEG)
  ll_B = dag_log_likelihood(emit, out.log_links_BxNxN, out.log_start_BxN, out.end_BxN,
                            lay.count_B)
  if normalize:
    no_emission = jnp.broadcast_to(jnp.where(valid_N[:, None, :], 0.0, NEG), emit.shape)
    ll_B = ll_B - dag_log_likelihood(no_emission, out.log_links_BxNxN, out.log_start_BxN,
                                     out.end_BxN, lay.count_B)
  return ll_B, lay.count_B.astype(jnp.float32)


def joint_terms(model, batch, key, setup, *, ratio: float) -> LossTerms:
  """ExLM's joint NLL of the masked tokens, -log P(Y | xt) with P normalised over V^m (divided by
  Z), at exactly round(ratio x real) [MASK]s drawn as the `masked` measures draw them (the same
  key gives the same masks), per masked token. The measures exlm15, exlm40 and exlm80."""
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  real_B = jnp.sum(token_mask, axis=1)
  count_B = masking.mask_count(real_B, ratio)
  scored = masking.choose_uniform(key, token_mask, count_B)
  noise = count_B / jnp.maximum(real_B, 1) if model.cfg.time_conditioning else None
  ll_B, masked_B = joint_log_likelihood(
      model, x0, scored, max(1, int(masking.mask_count(x0.shape[1], ratio))), noise,
      token_mask_BxL=token_mask, normalize=True)
  del setup
  return LossTerms(-ll_B, masked_B, masked_B)


@register
class ExLMObjective(Objective):
  """See the module docstring."""

  name = "exlm"
  settings_class = ExLMConfig
  causal = False
  measures = ("exlm15", "exlm", "masked", "nelbo", "pll")

  def cap(self, length: int) -> int:
    return int(masking.mask_count(length, self.setup.masking.p))

  def draw(self, batch, key, step, state):
    del step, state
    m = self.setup.masking
    x0, token_mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["token_mask"], bool)
    count_B = masking.mask_count(jnp.sum(token_mask, axis=1), m.p)
    if m.content == "span":
      scored = masking.choose_spans(jax.random.fold_in(key, 1), token_mask, count_B, m.span_mean)
    else:
      scored = masking.choose_uniform(jax.random.fold_in(key, 1), token_mask, count_B)
    return {"xt": jnp.where(scored, jnp.asarray(self.setup.mask_id, x0.dtype), x0),
            "scored": scored}

  def loss(self, model, batch, key, *, dropout_key=None):
    del key  # the draw is in the batch
    if not hasattr(model, "dag_outputs"):
      raise ValueError("objective=exlm needs an ExLM model (model.exlm_states >= 1).")
    x0, scored = batch["tokens"], batch["scored"]
    noise = None
    if model.cfg.time_conditioning:
      real_B = jnp.maximum(jnp.sum(batch["token_mask"], axis=1), 1)
      noise = jnp.sum(scored, axis=1) / real_B
    ll_B, count_B = joint_log_likelihood(
        model, x0, scored, self.cap(x0.shape[1]), noise,
        token_mask_BxL=self.setup.attention_mask(batch), dropout_key=dropout_key)
    if self.setup.masking.weighting == "mean_masked":
      has_B = (count_B > 0).astype(jnp.float32)
      return LossTerms(-ll_B / jnp.maximum(count_B, 1.0), has_B, count_B), {}
    return LossTerms(-ll_B, count_B, count_B), {}

  def denominator(self, batch):
    count_B = jnp.sum(batch["scored"], axis=-1)
    if self.setup.masking.weighting == "mean_masked":
      return jnp.sum(count_B > 0).astype(jnp.float32)
    return jnp.sum(count_B).astype(jnp.float32)
