"""The forward (masking) process and the Rao-Blackwellized masked-diffusion NELBO.

Notation (MDLM, Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models";
MD4, Shi et al. 2024, "Simplified and Generalized Masked Diffusion for Discrete Data"):

  x0     clean tokens in {0..V-1};  m = mask_id, the absorbing state.
  xt     x0 with each real token independently replaced by m with probability 1 - alpha(t).
  NELBO  L = int_0^1 w(t) E_xt[ sum_{i: xt_i = m} -log p_theta(x0_i | xt) ] dt,
         w(t) = -alpha'(t) / (1 - alpha(t)).

We draw t ~ U[t_min, 1) (antithetic across the global batch) and estimate the integral over
[t_min, 1]; the per-token terms therefore carry the density correction (1 - t_min). With T
discrete steps the integral becomes the sum over t in {1/T, ..., 1} of
T (alpha_s - alpha_t) / (1 - alpha_t) E[...], s = t - 1/T (MDLM eq. 8).

SUBS parameterization (MDLM section 3.2.3): the mask logit is -inf, and a position with
xt_i != m copies xt_i; such a position's loss term is exactly zero, so only masked positions
enter the sum. All loss arithmetic is float32 whatever the compute dtype of the logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdlm import schedules as schedules_lib

T_MIN = 1e-3


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_times(t, t_min: float = 0.0):
  if _is_concrete(t):
    t_np = np.asarray(t)
    if t_np.size and (not np.all(np.isfinite(t_np)) or t_np.min() <= 0 or t_np.max() > 1):
      raise ValueError(
          f"Diffusion times must lie in (0, 1]; got values in [{t_np.min()}, {t_np.max()}].")


def _check_tokens(name, x, vocab_size):
  if _is_concrete(x) and vocab_size is not None:
    x_np = np.asarray(x)
    if x_np.size and (x_np.min() < 0 or x_np.max() >= vocab_size):
      raise ValueError(
          f"{name} holds token ids outside [0, {vocab_size}): min {x_np.min()}, max {x_np.max()}.")


def sample_times(key, batch_size: int, *, t_min: float = T_MIN, antithetic: bool = True,
                 num_steps: int | None = None):
  """t_B in [t_min, 1): stratified over the whole (global) batch, t_i = (u + i/B) mod 1.

  With num_steps = T (the discrete-time NELBO) t_B = k/T with the step k uniform on {1, ..., T}
  (k = floor(u T) + 1 of the same stratified u): every step of the sum is equally likely.

  Call this on the global batch (inside the sharded step), not per device: the strata then cover
  [t_min, 1) once per global batch, which lowers the variance of the loss estimate.
  """
  if not 0.0 <= t_min < 1.0:
    raise ValueError(f"t_min must lie in [0, 1), got {t_min}.")
  u_B = stratified_uniform(key, batch_size, antithetic=antithetic)
  if num_steps is not None:
    step_B = jnp.minimum(jnp.floor(u_B * num_steps) + 1.0, num_steps)
    return step_B / num_steps
  return t_min + (1.0 - t_min) * u_B


def stratified_uniform(key, batch_size: int, *, antithetic: bool = True):
  """u_B in [0, 1): (u + i/B) mod 1 with one shared u ~ U[0, 1) (each stratum of width 1/B
  holds exactly one draw), or B independent draws."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if antithetic:
    u = jax.random.uniform(key, (), jnp.float32)
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jax.random.uniform(key, (batch_size,), jnp.float32)


def corrupt(key, x0_BxL, t_B, schedule: schedules_lib.Schedule, mask_id: int, token_mask_BxL=None):
  """Forward process q(xt | x0): each real token becomes mask_id with probability 1 - alpha(t).

  Positions where token_mask is False (padding) are never masked.
  """
  x0_BxL = jnp.asarray(x0_BxL)
  if x0_BxL.ndim != 2:
    raise ValueError(f"x0 must have shape [batch, length], got {x0_BxL.shape}.")
  t_B = jnp.asarray(t_B)
  if t_B.shape != x0_BxL.shape[:1]:
    raise ValueError(f"t must have shape [batch]={x0_BxL.shape[:1]}, got {t_B.shape}.")
  _check_times(t_B)
  if token_mask_BxL is not None and jnp.shape(token_mask_BxL) != x0_BxL.shape:
    raise ValueError(
        f"token_mask shape {jnp.shape(token_mask_BxL)} differs from x0 shape {x0_BxL.shape}.")
  p_mask_Bx1 = schedule.mask_prob(t_B)[:, None]
  move_BxL = jax.random.uniform(key, x0_BxL.shape, jnp.float32) < p_mask_Bx1
  if token_mask_BxL is not None:
    move_BxL = move_BxL & jnp.asarray(token_mask_BxL, bool)
  return jnp.where(move_BxL, jnp.asarray(mask_id, x0_BxL.dtype), x0_BxL)


def subs_log_probs(logits_BxLxV, xt_BxL, mask_id: int):
  """log p_theta(x0 | xt) under SUBS, in float32, over the V real tokens.

  The mask entry, when the logits carry one (V + 1 entries, or mask_id < V), gets -inf; at
  unmasked positions the distribution is the one-hot of xt (log-prob 0 at xt, -inf elsewhere).
  """
  logits = jnp.asarray(logits_BxLxV, jnp.float32)
  num_out = logits.shape[-1]
  if mask_id < num_out:
    logits = logits.at[..., mask_id].set(-jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  carry = jax.nn.one_hot(jnp.minimum(xt_BxL, num_out - 1), num_out, dtype=bool)
  carry_logp = jnp.where(carry, 0.0, -jnp.inf)
  return jnp.where((xt_BxL == mask_id)[..., None], logp, carry_logp)


def cross_entropy(logits_BxLxV, targets_BxL):
  """-log softmax(logits)[target] at every position, in float32: the one cross-entropy every
  loss and measure of the package uses (logsumexp minus the target's logit)."""
  logits = jnp.asarray(logits_BxLxV, jnp.float32)
  logz_BxL = jax.nn.logsumexp(logits, axis=-1)
  targets = jnp.asarray(targets_BxL)[..., None].astype(jnp.int32)
  return logz_BxL - jnp.take_along_axis(logits, targets, axis=-1)[..., 0]


def masked_cross_entropy(logits_BxLxV, x0_BxL, mask_id):
  """-log p_theta(x0_i | xt) from the model logits with the mask logit removed (float32)."""
  logits = jnp.asarray(logits_BxLxV, jnp.float32)
  if mask_id < logits.shape[-1]:
    logits = logits.at[..., mask_id].set(-jnp.inf)
  return cross_entropy(logits, x0_BxL)


def time_weight(t_B, schedule: schedules_lib.Schedule, *, num_steps: int | None = None,
                t_min: float = T_MIN):
  """The weight multiplying the masked cross-entropy at time t.

  Continuous time: (1 - t_min) w(t), the NELBO weight times the inverse density of t.
  Discrete time with T steps: T (alpha_s - alpha_t) / (1 - alpha_t), s = t - 1/T.
  """
  t_B = jnp.asarray(t_B, jnp.float32)
  if num_steps is None:
    return (1.0 - t_min) * schedule.weight(t_B)
  s_B = t_B - 1.0 / num_steps
  alpha_t, alpha_s = schedule.alpha(t_B), schedule.alpha(s_B)
  return num_steps * (alpha_s - alpha_t) / (1.0 - alpha_t)


def nelbo(logits_BxLxV, x0_BxL, xt_BxL, t_B, schedule: schedules_lib.Schedule, mask_id: int,
          token_mask_BxL=None, *, num_steps: int | None = None, t_min: float = T_MIN):
  """Per-token NELBO contributions [B, L] (float32).

  Zero where xt is not masked and at padding. sum(...) / (number of real tokens) is the NELBO per
  token. `logits` may have V or V + 1 entries on the last axis; the mask logit is ignored.
  Continuous time by default (t ~ U[t_min, 1)); `num_steps=T` gives the discrete-time NELBO, with
  t already on the grid {1/T, ..., 1} (`sample_times(..., num_steps=T)`).
  """
  x0_BxL, xt_BxL = jnp.asarray(x0_BxL), jnp.asarray(xt_BxL)
  if x0_BxL.ndim != 2 or xt_BxL.shape != x0_BxL.shape:
    raise ValueError(f"x0 and xt must both be [batch, length]; got {x0_BxL.shape}, {xt_BxL.shape}.")
  if jnp.ndim(logits_BxLxV) != 3 or jnp.shape(logits_BxLxV)[:2] != x0_BxL.shape:
    raise ValueError(
        f"logits must be [batch, length, vocab] with [batch, length]={x0_BxL.shape}; "
        f"got {jnp.shape(logits_BxLxV)}.")
  if jnp.shape(t_B) != x0_BxL.shape[:1]:
    raise ValueError(f"t must have shape [batch]={x0_BxL.shape[:1]}, got {jnp.shape(t_B)}.")
  if token_mask_BxL is not None and jnp.shape(token_mask_BxL) != x0_BxL.shape:
    raise ValueError(
        f"token_mask shape {jnp.shape(token_mask_BxL)} differs from x0 shape {x0_BxL.shape}.")
  _check_times(t_B)
  vocab_size = min(jnp.shape(logits_BxLxV)[-1], mask_id) if mask_id > 0 else None
  _check_tokens("x0", x0_BxL, vocab_size)

  ce_BxL = masked_cross_entropy(logits_BxLxV, x0_BxL, mask_id)
  counted_BxL = xt_BxL == mask_id
  if token_mask_BxL is not None:
    counted_BxL = counted_BxL & jnp.asarray(token_mask_BxL, bool)
  weight_Bx1 = time_weight(t_B, schedule, num_steps=num_steps, t_min=t_min)[:, None]
  # where() rather than multiply: a carried-over position must contribute exactly 0 even if the
  # (ignored) logits there are not finite.
  return jnp.where(counted_BxL, weight_Bx1 * ce_BxL, 0.0)


class LossTerms(NamedTuple):
  """Per-sequence sums that evaluation and scaling aggregate across batches and hosts."""

  nll_sum_B: jax.Array      # summed NELBO (or NLL) terms per sequence, nats
  num_tokens_B: jax.Array   # real tokens per sequence (the denominator)
  num_masked_B: jax.Array   # positions that entered the sum


def loss_terms(per_token_BxL, token_mask_BxL=None, counted_BxL=None) -> LossTerms:
  per_token_BxL = jnp.asarray(per_token_BxL, jnp.float32)
  if token_mask_BxL is None:
    token_mask_BxL = jnp.ones(per_token_BxL.shape, bool)
  num_tokens_B = jnp.sum(token_mask_BxL, axis=-1).astype(jnp.float32)
  if counted_BxL is None:
    counted_BxL = per_token_BxL != 0
  return LossTerms(jnp.sum(per_token_BxL, axis=-1), num_tokens_B,
                   jnp.sum(counted_BxL, axis=-1).astype(jnp.float32))


def summarize(nll_sum: float, num_tokens: float) -> dict[str, float]:
  """NELBO per token in nats, perplexity and bits per token."""
  if num_tokens <= 0:
    raise ValueError("Cannot summarize a loss over zero tokens.")
  nats = float(nll_sum) / float(num_tokens)
  return {"nll": nats, "ppl": math.exp(min(nats, 700.0)), "bpt": nats / math.log(2.0)}


def diffusion_loss(key, apply_fn, x0_BxL, schedule, mask_id, token_mask_BxL=None, *,
                   num_steps=None, t_min=T_MIN, antithetic=True):
  """One Monte Carlo draw of the NELBO for a batch: sample t, corrupt, denoise, score.

  apply_fn(xt_BxL, t_B) -> logits. Returns (per_token_BxL, xt_BxL, t_B).
  """
  time_key, mask_key = jax.random.split(key)
  t_B = sample_times(time_key, x0_BxL.shape[0], t_min=t_min, antithetic=antithetic,
                     num_steps=num_steps)
  xt_BxL = corrupt(mask_key, x0_BxL, t_B, schedule, mask_id, token_mask_BxL)
  logits = apply_fn(xt_BxL, t_B)
  per_token = nelbo(logits, x0_BxL, xt_BxL, t_B, schedule, mask_id, token_mask_BxL,
                    num_steps=num_steps, t_min=t_min)
  return per_token, xt_BxL, t_B


def ar_nll(logits_BxLxV, x_BxL, token_mask_BxL=None):
  """Exact next-token NLL terms [B, L-1]: position i predicts x_{i+1} (float32).

  logits are the causal model's outputs on x (all L positions); the last one predicts nothing.
  """
  nll = cross_entropy(jnp.asarray(logits_BxLxV, jnp.float32)[:, :-1], jnp.asarray(x_BxL)[:, 1:])
  if token_mask_BxL is not None:
    nll = jnp.where(jnp.asarray(token_mask_BxL, bool)[:, 1:], nll, 0.0)
  return nll
