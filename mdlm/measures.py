"""Evaluation measures: ways to score a trained model on a batch, whatever objective trained it.

Each measure maps (model, batch, key, setup) to per-sequence `LossTerms` (summed nats and the
count they are per), so the evaluator pools them over batches and hosts with standard errors.

  nelbo     MDLM's NELBO per real token (mdlm.diffusion): an upper bound on the NLL of any
            bidirectional denoiser, however it was trained. Monte Carlo over (t, xt).
  ar        the exact next-token NLL under causal attention, per scored target.
  pll       the pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring"): each
            real position masked alone, -log p(x_i | x_without_i), per real token. Reported as
            pseudo-perplexity; it is not a likelihood. Deterministic.
  masked    the masked-LM task itself: exactly round(r x real tokens) positions masked uniformly
            at random, the mean -log p(x_i | xt) per masked token, at r = 15%, 40% and 80%
            (reported as masked15, masked40, masked80). Monte Carlo over the mask.
  maria     the MARIA head's cross-entropy per masked token (mdlm.models.hybrid).
Which measures apply to a model is declared by the objectives that trained it
(Objective.measures); the evaluator refuses the others.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mdlm import diffusion, masking
from mdlm.diffusion import LossTerms
from mdlm.models import hybrid
from mdlm.objectives.base import Setup

MASKED_RATIOS = (0.15, 0.40, 0.80)


@dataclasses.dataclass(frozen=True)
class Measure:
  name: str
  fn: Callable[..., LossTerms]    # (model, batch, key, setup) -> LossTerms
  stochastic: bool                # Monte Carlo: averaged over `time_samples` draws
  unit: str                       # what the pooled figure is per
  label: str                      # how it is printed (NELBO, NLL, PLL, ...)


def nelbo_terms(model, batch, key, setup: Setup) -> LossTerms:
  """One draw of MDLM's NELBO per real token (continuous time, or discrete with num_steps)."""
  x0, token_mask = batch["tokens"], batch["token_mask"]

  def apply_fn(xt, t):
    noise = setup.schedule.mask_prob(t) if model.cfg.time_conditioning else None
    return model(xt, noise, token_mask_BxL=setup.attention_mask(batch), causal=False)

  per_token, xt, _ = diffusion.diffusion_loss(
      key, apply_fn, x0, setup.schedule, setup.mask_id, token_mask, num_steps=setup.num_steps,
      t_min=setup.t_min, antithetic=setup.antithetic)
  return diffusion.loss_terms(per_token, token_mask, (xt == setup.mask_id) & token_mask)


def ar_terms(model, batch, key, setup: Setup) -> LossTerms:
  """The exact next-token NLL of every real target (causal attention)."""
  del key
  x, token_mask = batch["tokens"], batch["token_mask"]
  logits = model(x, token_mask_BxL=setup.attention_mask(batch), causal=True)
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
  logits = model(xt, noise, token_mask_BxL=setup.attention_mask(batch), causal=False)
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
  attention = setup.attention_mask(batch)
  attention_rows = None if attention is None else jnp.repeat(attention, chunk, axis=0)

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
  return hybrid.maria_loss(head, batch, key, schedule=setup.schedule, t_min=setup.t_min,
                           antithetic=setup.antithetic)


def _masked_measures():
  return {f"masked{round(100 * r)}": Measure(
      f"masked{round(100 * r)}", functools.partial(masked_terms, ratio=r), True,
      "masked token", f"masked-token NLL at {round(100 * r)}%") for r in MASKED_RATIOS}


MEASURES: dict[str, Measure] = {
    "nelbo": Measure("nelbo", nelbo_terms, True, "token", "NELBO"),
    "ar": Measure("ar", ar_terms, False, "token", "NLL"),
    "pll": Measure("pll", pll_terms, False, "token", "pseudo-NLL (PLL)"),
    **_masked_measures(),
    "maria": Measure("maria", maria_terms, True, "masked token", "MARIA NLL"),
}

# Names a user (or an objective) may give for a group of measures.
GROUPS = {"masked": tuple(f"masked{round(100 * r)}" for r in MASKED_RATIOS)}


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
