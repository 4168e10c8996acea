"""Evaluation measures: ways to score a trained model on a batch, whatever objective trained it.

Each measure maps (model, batch, key, setup) to per-sequence `LossTerms` (summed nats and the
count they are per), so the evaluator pools them over batches and hosts with standard errors.
Evaluation batches may end in padding (the last window of a split), so every measure masks the
padding out of attention.

  nelbo     MDLM's NELBO per real token (mdlm.diffusion): an upper bound on the NLL of any
            bidirectional denoiser, however it was trained. Monte Carlo over (t, xt).
  ar        the exact next-token NLL under causal attention, per scored target.
  pll       the pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring"): each
            real position masked alone, -log p(x_i | x_without_i), per real token. Reported as
            pseudo-perplexity; it is not a likelihood. Deterministic.
  masked    the masked-LM task itself: exactly round(r x real tokens) positions masked uniformly
            at random, the mean -log p(x_i | xt) per masked token, at r = 15%, 40% and 80%
            (reported as masked15, masked40, masked80). Monte Carlo over the mask.
  maria     the MARIA head's cross-entropy per masked token (mdlm.objectives.maria).
  exlm      ExLM's joint NLL of the masked tokens, -log P(masked tokens | xt) per masked token,
            with the masks of `masked` (exlm15, exlm40, exlm80; mdlm.objectives.exlm).
  bd3lm     the block-diffusion NELBO per real token of a bd3lm run, at its block size
            (mdlm.objectives.block; b = L is the nelbo measure, b = 1 the exact AR NLL).
Which measures apply to a model is declared by the objectives that trained it
(Objective.measures); the evaluator refuses the others.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mdlm import diffusion, masking
from mdlm.diffusion import LossTerms
from mdlm.objectives.base import Setup
from mdlm.objectives import block as block_objective
from mdlm.objectives.exlm import joint_terms as exlm_joint_terms
from mdlm.objectives.maria import maria_loss

MASKED_RATIOS = (0.15, 0.40, 0.80)


@dataclasses.dataclass(frozen=True)
class Measure:
  name: str
  fn: Callable[..., LossTerms]    # (model, batch, key, setup) -> LossTerms
  stochastic: bool                # Monte Carlo: averaged over `time_samples` draws
  unit: str                       # what the pooled figure is per
  label: str                      # how it is printed (NELBO, NLL, PLL, ...)
  skips_first_token: bool = False  # the first token of a row is not scored (next-token NLL)

  def scored_tokens(self, token_mask_BxL):
    """The positions whose text the figure covers, for bits per character (unit "token")."""
    scored = np.asarray(token_mask_BxL, bool).copy()
    if self.skips_first_token:
      scored[:, 0] = False
    return scored


def nelbo_terms(model, batch, key, setup: Setup) -> LossTerms:
  """One draw of the full NELBO per real token, a true upper bound on -log p(x):

    E_q[-log p(x0 | x_t0)]  +  int_t0^1 w(t) E[CE] dt  +  KL(q(x_1 | x0) || p(x_1))

  with t0 = t_min (continuous time; the sum over the grid with num_steps). The middle term is
  the training objective (mdlm.diffusion); the first is the reconstruction from the few tokens
  masked at t0 (`reconstruction_terms`); the last is the prior term: x_1 keeps each token with
  probability alpha(1) > 0, so the generative model starts from p(x_1) = each token masked with
  probability 1 - alpha(1), else uniform over the V real tokens, and the KL is alpha(1) log V
  per token. A uniform model then scores exactly log V. Padding is masked out of attention."""
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)

  def apply_fn(xt, t):
    noise = setup.schedule.mask_prob(t) if model.cfg.time_conditioning else None
    return model(xt, noise, token_mask_BxL=token_mask, causal=False)

  per_token, xt, _ = diffusion.diffusion_loss(
      jax.random.fold_in(key, 0), apply_fn, x0, setup.schedule, setup.mask_id, token_mask,
      num_steps=setup.num_steps, t_min=setup.t_min, antithetic=setup.antithetic)
  real_B = jnp.sum(token_mask, axis=-1).astype(jnp.float32)
  with jax.ensure_compile_time_eval():  # a constant of the schedule, not a traced value
    alpha_1 = float(setup.schedule.alpha(1.0))
  total_B = (jnp.sum(per_token, axis=-1)
             + reconstruction_terms(model, batch, jax.random.fold_in(key, 1), setup)
             + real_B * alpha_1 * math.log(setup.vocab_size))
  return LossTerms(total_B, real_B, jnp.sum((xt == setup.mask_id) & token_mask, -1).astype(
      jnp.float32))


def reconstruction_terms(model, batch, key, setup: Setup):
  """E_{x_t0 ~ q}[sum over the masked i of -log p(x0_i | x_t0)] per row, t0 = t_min (0 in
  discrete time), estimated without the zero-inflation of a plain draw (at t0 almost no token is
  masked): one real position j is chosen uniformly and masked, every other one with probability
  p0 = 1 - alpha(t0), and the estimate is n p0 CE_j (unbiased: sum_j (1/n) n p0 E[CE_j | j
  masked]). Zero when alpha(t0) = 1."""
  t0 = 0.0 if setup.num_steps is not None else setup.t_min
  with jax.ensure_compile_time_eval():
    p0 = float(setup.schedule.mask_prob(t0))
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  if p0 <= 0.0:
    return jnp.zeros(x0.shape[:1], jnp.float32)
  pick_key, mask_key = jax.random.split(key)
  score_BxL = jnp.where(token_mask, jax.random.uniform(pick_key, x0.shape), -1.0)
  j_B = jnp.argmax(score_BxL, axis=1)
  picked_BxL = jnp.arange(x0.shape[1])[None, :] == j_B[:, None]
  masked_BxL = token_mask & (picked_BxL | (jax.random.uniform(mask_key, x0.shape) < p0))
  xt = jnp.where(masked_BxL, jnp.asarray(setup.mask_id, x0.dtype), x0)
  real_B = jnp.sum(token_mask, axis=-1).astype(jnp.float32)
  noise = jnp.full(x0.shape[:1], p0) if model.cfg.time_conditioning else None
  logits = model(xt, noise, token_mask_BxL=token_mask, causal=False)
  ce_B = jnp.sum(jnp.where(picked_BxL, diffusion.masked_cross_entropy(logits, x0, setup.mask_id),
                           0.0), axis=-1)
  return jnp.where(real_B > 0, real_B * p0 * ce_B, 0.0)


def ar_terms(model, batch, key, setup: Setup) -> LossTerms:
  """The exact next-token NLL of every real target (causal attention)."""
  del key
  x, token_mask = batch["tokens"], batch["token_mask"]
  logits = model(x, token_mask_BxL=token_mask, causal=True)
  nll = diffusion.ar_nll(logits, x, token_mask)
  counted = jnp.sum(token_mask[:, 1:], axis=-1).astype(jnp.float32)
  return LossTerms(nll.sum(-1), counted, counted)


def masked_terms(model, batch, key, setup: Setup, *, ratio: float) -> LossTerms:
  """Masked-token NLL at a fixed ratio: exactly round(ratio x real) masked, uniformly."""
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  real_B = jnp.sum(token_mask, axis=1)
  count_B = masking.mask_count(real_B, ratio)
  chosen = masking.choose_uniform(key, token_mask, count_B)
  xt = jnp.where(chosen, jnp.asarray(setup.mask_id, x0.dtype), x0)
  noise = count_B / jnp.maximum(real_B, 1) if model.cfg.time_conditioning else None
  logits = model(xt, noise, token_mask_BxL=token_mask, causal=False)
  ce_BxL = diffusion.masked_cross_entropy(logits, x0, setup.mask_id)
  scored_B = jnp.sum(chosen, axis=-1).astype(jnp.float32)
  return LossTerms(jnp.sum(jnp.where(chosen, ce_BxL, 0.0), axis=-1), scored_B, scored_B)


def pll_terms(model, batch, key, setup: Setup, *, chunk: int = 16) -> LossTerms:
  """The pseudo-log-likelihood: for each real position i, x with only i masked, and
  -log p(x_i | x_without_i). `chunk` positions per forward pass (B x chunk rows); the output head
  runs at the one masked position of each row only."""
  del key
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  batch_size, length = x0.shape
  chunk = min(chunk, length)
  num_chunks = -(-length // chunk)
  noise = 1.0 / jnp.maximum(jnp.sum(token_mask, axis=1), 1)  # one of n tokens masked
  attention_rows = jnp.repeat(token_mask, chunk, axis=0)

  def one_chunk(c):
    pos_P = c * chunk + jnp.arange(chunk)
    valid_BxP = (pos_P < length)[None, :] & token_mask[:, jnp.minimum(pos_P, length - 1)]
    pos_P = jnp.minimum(pos_P, length - 1)
    hit_PxL = pos_P[:, None] == jnp.arange(length)[None, :]
    xt = jnp.where(hit_PxL[None], jnp.asarray(setup.mask_id, x0.dtype), x0[:, None, :])
    rows = xt.reshape(batch_size * chunk, length)
    noise_rows = jnp.repeat(noise, chunk) if model.cfg.time_conditioning else None
    hidden = model.hidden_states(rows, noise_rows, token_mask_BxL=attention_rows, causal=False)
    at = jnp.take_along_axis(hidden, jnp.tile(pos_P, batch_size)[:, None, None], axis=1)
    logits = model.logits(at)  # [B * P, 1, V]
    target = x0[:, pos_P].reshape(batch_size * chunk, 1)
    ce = diffusion.masked_cross_entropy(logits, target, setup.mask_id).reshape(batch_size, chunk)
    return jnp.sum(jnp.where(valid_BxP, ce, 0.0), axis=1)

  nll_B = jnp.sum(jax.lax.map(one_chunk, jnp.arange(num_chunks)), axis=0)
  real_B = jnp.sum(token_mask, axis=-1).astype(jnp.float32)
  return LossTerms(nll_B, real_B, real_B)


def maria_terms(head, batch, key, setup: Setup) -> LossTerms:
  """The MARIA head's cross-entropy per masked token, masks drawn as in its training."""
  return maria_loss(head, batch, key, schedule=setup.schedule, t_min=setup.t_min,
                           antithetic=setup.antithetic)


def _masked_measures():
  return {f"masked{round(100 * r)}": Measure(
      f"masked{round(100 * r)}", functools.partial(masked_terms, ratio=r), True,
      "masked token", f"masked-token NLL at {round(100 * r)}%") for r in MASKED_RATIOS}


MEASURES: dict[str, Measure] = {
    "nelbo": Measure("nelbo", nelbo_terms, True, "token", "NELBO"),
    "ar": Measure("ar", ar_terms, False, "token", "NLL", skips_first_token=True),
    "pll": Measure("pll", pll_terms, False, "token", "pseudo-NLL (PLL)"),
    **_masked_measures(),
    "maria": Measure("maria", maria_terms, True, "masked token", "MARIA NLL"),
    **{f"exlm{round(100 * r)}": Measure(
        f"exlm{round(100 * r)}", functools.partial(exlm_joint_terms, ratio=r), True,
        "masked token", f"ExLM joint masked-token NLL at {round(100 * r)}%")
       for r in MASKED_RATIOS},
    "bd3lm": Measure("bd3lm", block_objective.nelbo_terms, True, "token", "block NELBO"),
}

# Names a user (or an objective) may give for a group of measures.
GROUPS = {"masked": tuple(f"masked{round(100 * r)}" for r in MASKED_RATIOS),
          "exlm": tuple(f"exlm{round(100 * r)}" for r in MASKED_RATIOS)}


def expand(names) -> list[str]:
  """Measure names with groups expanded ("masked" -> masked15, masked40, masked80), in order,
  without repeats; unknown names are refused."""
  out = []
  for name in names:
    for item in GROUPS.get(name, (name,)):
      if item not in MEASURES:
        raise ValueError(f"Unknown measure {name!r}; choose from "
                         f"{', '.join(list(MEASURES) + list(GROUPS))}.")
      if item not in out:
        out.append(item)
  return out


def get(name: str) -> Measure:
  return MEASURES[expand([name])[0]]
