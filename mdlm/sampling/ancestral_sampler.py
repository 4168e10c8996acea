"""Ancestral sampling of the masked diffusion reverse process, with step skipping ("cache").

The reverse step from t to s < t (Austin et al. 2021, "Structured Denoising Diffusion Models in
Discrete State-Spaces"; Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
Models", eq. 6): a masked position stays masked with probability (1 - alpha_s) / (1 - alpha_t),
otherwise it takes token v with probability p_theta(v | xt); unmasked tokens never change.

Two facts make an exact, cheap implementation possible:

1. The stay-masked decision does not depend on the denoiser output. Over the grid
   1 = t_0 > t_1 > ... > t_T the per-step stay probabilities telescope: a position masked at t_0
   is still masked after step k with probability r_k = (1 - alpha(t_k)) / (1 - alpha(t_0)). So one
   uniform u_i per position fixes the step at which it unmasks, K_i = 1 + #{k >= 1 : u_i < r_k}
   (K_i = T + 1: still masked at the end; the final noise-removal pass takes the argmax there, as
   MDLM does). This has exactly the distribution of T successive Bernoulli decisions.
2. A position is sampled once, so one (53-bit) uniform per position serves its token draw:
   given the history, the uniforms of the positions unmasking at step k are fresh and independent.

Step k calls the denoiser on x_{t_{k-1}} at time t_{k-1} and only positions with K_i = k read its
output. A step at which no position of a row unmasks changes nothing, and its denoiser output is
never read; the cached sampler therefore skips it: each row jumps straight to its next unmasking
step (rows advance independently; the denoiser gets per-row times t_B). The denoiser runs exactly
when the uncached sampler's output would be used, on the same input at the same time, so cached
and uncached samplers return the same tokens for the same key, also for time-conditioned
denoisers (MDLM's cache, which reuses an output at a later t, is only valid without time
conditioning; skipping is valid with it). Batch 1 with T >> L needs at most L + 1 calls.

Only the positions that unmask at a step are turned into tokens: they are gathered into a
[B, budget] slab, and the denoiser's output head runs at those positions only
(`denoisers.stages`) before softmax and sampling, so the per-call work of the sampler is tiny next
to the denoiser; a step with more unmasking positions than the budget is handled in several
slabs of the same denoiser features.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mdlm.sampling import common, denoisers
from mdlm import categorical

GRIDS = ("uniform", "cosine")


def time_grid(steps: int, grid: str = "uniform", t_end: float = 1e-5) -> np.ndarray:
  """t_0 = 1 > t_1 > ... > t_T = t_end (float32).

  uniform: equal steps in t (MDLM). cosine: t_k = t_end + (1 - t_end) cos(pi k / 2T), small steps
  near t = 1 and large ones near 0 (the cosine sampling grid of Shi et al. 2024, "Simplified and
  Generalized Masked Diffusion for Discrete Data").
  """
  frac = np.arange(steps + 1, dtype=np.float64) / steps
  if grid == "uniform":
    t = 1.0 - (1.0 - t_end) * frac
  elif grid == "cosine":
    t = t_end + (1.0 - t_end) * np.cos(0.5 * np.pi * frac)
  else:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")
  return t.astype(np.float32)


def still_masked_prob(t_grid, schedule) -> np.ndarray:
  """r_k = (1 - alpha(t_k)) / (1 - alpha(t_0)): P(a position masked at t_0 is masked at t_k)."""
  masked = 1.0 - np.asarray(schedule.alpha(jnp.asarray(t_grid)), np.float64)
  if not np.all(np.isfinite(masked)) or masked[0] <= 0:
    raise ValueError(f"schedule {schedule!r} gives 1 - alpha(1) = {masked[0]}; need > 0.")
  r = np.minimum(masked / masked[0], 1.0)
  # A schedule is non-increasing in alpha; guard float noise so r stays non-increasing.
  return np.minimum.accumulate(r).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static settings of one compiled ancestral sampler."""

  steps: int
  mask_id: int
  cache: bool
  temperature: float
  top_p: float
  budget: int  # positions turned into tokens per slab


def _budget(r: np.ndarray, masked: int) -> int:
  """A slab size that holds one step's unmasking positions with high probability."""
  step_fraction = float(np.max(np.concatenate([-np.diff(r), r[-1:]])))
  mean = masked * step_fraction
  return int(max(1, min(masked, math.ceil(mean + 4.0 * math.sqrt(mean) + 1.0))))


def unmask_steps(key, masked_BxL, r_grid):
  """K_i in {1..T+1} for masked positions (0 elsewhere): the step at which each one unmasks."""
  u_BxL = jax.random.uniform(key, masked_BxL.shape, jnp.float32)
  # r is non-increasing: #{k >= 1 : r_k > u} = searchsorted of -u in the ascending -r[1:].
  k_BxL = 1 + jnp.searchsorted(-r_grid[1:], -u_BxL, side="left").astype(jnp.int32)
  return jnp.where(masked_BxL, k_BxL, 0)


def _fill(x_BxL, select_BxL, features, logits_at, final_B, bits_2xBxL, spec: Spec):
  """Writes tokens at the selected positions from one denoiser call, slab by slab.

  final rows take the argmax (noise removal); the others draw from the tempered, top-p filtered
  SUBS distribution with each position's own uniform.
  """
  size = spec.budget
  rank_BxL = jnp.cumsum(select_BxL, axis=1, dtype=jnp.int32) - 1
  count = jnp.max(jnp.sum(select_BxL, axis=1, dtype=jnp.int32))
  num_slabs = (count + size - 1) // size

  def slab(j, x):
    idx_BxS = common.compact(select_BxL, rank_BxL, j * size, size)
    logits_BxSxV = logits_at(features, idx_BxS)
    b, s, v = logits_BxSxV.shape
    logits_NxV = categorical.subs_logits(logits_BxSxV.reshape(b * s, v), spec.mask_id)
    bits_2xN = common.gather_bits(bits_2xBxL, idx_BxS).reshape(2, b * s)
    drawn = categorical.draw(logits_NxV, bits_2xN, temperature=spec.temperature,
                       top_p=spec.top_p).reshape(b, s)
    greedy = categorical.argmax(logits_NxV).reshape(b, s)
    tokens_BxS = jnp.where(final_B[:, None], greedy, drawn)
    return common.scatter_rows(x, idx_BxS, tokens_BxS)

  return jax.lax.fori_loop(0, num_slabs, slab, x_BxL)


def _ancestral_loop(denoise, key, xt_BxL, t_grid, r_grid, spec: Spec):
  b, _ = xt_BxL.shape
  steps = spec.steps
  features_of, logits_at = denoisers.stages(denoise)
  masked0_BxL = xt_BxL == spec.mask_id
  k_BxL = unmask_steps(jax.random.fold_in(key, 0), masked0_BxL, r_grid)
  bits_2xBxL = categorical.uniform_bits(jax.random.fold_in(key, 1), xt_BxL.shape)
  never = jnp.int32(steps + 2)

  if spec.cache:
    def cond(carry):
      x, _ = carry
      return jnp.any(x == spec.mask_id)

    def body(carry):
      x, nfe = carry
      masked = x == spec.mask_id
      step_B = jnp.min(jnp.where(masked, k_BxL, never), axis=1)  # each row's next step
      t_B = t_grid[jnp.clip(step_B - 1, 0, steps)]
      features = features_of(x, t_B)
      select = masked & (k_BxL == step_B[:, None])
      x = _fill(x, select, features, logits_at, step_B == steps + 1, bits_2xBxL, spec)
      return x, nfe + 1

    x, nfe = jax.lax.while_loop(cond, body, (xt_BxL, jnp.int32(0)))
  else:
    def step(k, x):
      features = features_of(x, jnp.full((b,), t_grid[k - 1]))
      select = (x == spec.mask_id) & (k_BxL == k)
      return _fill(x, select, features, logits_at, jnp.full((b,), k == steps + 1), bits_2xBxL,
                   spec)

    x = jax.lax.fori_loop(1, steps + 2, step, xt_BxL)
    nfe = jnp.int32(steps + 1)
  return x, {"nfe": nfe, "steps": jnp.int32(steps), "fill_step": k_BxL}


def _ancestral_impl(static_fn, fn_arrays, key, xt_BxL, t_grid, r_grid, *, spec: Spec):
  return _ancestral_loop(denoisers.combine(static_fn, fn_arrays), key, xt_BxL, t_grid, r_grid,
                         spec)


_ancestral_jit = common.jit_with_denoiser(_ancestral_impl, static_argnames=("spec",))


def prepare(xt_BxL, denoise, *, steps, schedule, mask_id, cache, temperature, top_p, grid,
            t_end, max_masked=None):
  """Validates settings and builds (xt, t_grid, r_grid, spec); shared with semi_autoregressive."""
  steps = common.check_steps(steps)
  categorical.validate(temperature, top_p)
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")
  if not 0.0 < t_end < 1.0:
    raise ValueError(f"t_end must lie in (0, 1), got {t_end}.")
  if schedule is None:
    raise ValueError("ancestral sampling needs the noise schedule (mdlm.schedules.get(...)); it "
                     "sets how many positions unmask per step.")
  xt_BxL = common.check_xt(xt_BxL, mask_id, denoise)
  t_grid = time_grid(steps, grid, t_end)
  r_grid = still_masked_prob(t_grid, schedule)
  masked = common.max_masked(xt_BxL, mask_id) if max_masked is None else max_masked
  spec = Spec(steps=steps, mask_id=int(mask_id), cache=bool(cache),
              temperature=float(temperature), top_p=float(top_p),
              budget=_budget(r_grid, max(masked, 1)))
  return xt_BxL, jnp.asarray(t_grid), jnp.asarray(r_grid), spec


def ancestral(key, denoise, xt, *, steps: int, schedule, mask_id: int, cache: bool = True,
              temperature: float = 1.0, top_p: float = 1.0, grid: str = "uniform",
              t_end: float = 1e-5):
  """Samples the masked positions of xt [B, L] with T = `steps` ancestral steps.

  xt: all mask_id for unconditional generation; given tokens + mask_id for infilling/prompting
  (given tokens never change; every masked position ends filled). t runs from 1 to t_end on the
  `grid`, then a noise-removal pass takes the argmax at any position still masked.
  cache: skip steps at which no position unmasks (exact; see the module docstring).
  temperature: divides the log-probabilities (0 = greedy); top_p: nucleus filtering.

  Returns (tokens [B, L] int32, stats) with stats["nfe"] (denoiser calls), stats["steps"] (T) and
  stats["fill_step"] [B, L] (the step in 1..T+1 at which each position was filled; 0 if given).
  """
  xt, t_grid, r_grid, spec = prepare(xt, denoise, steps=steps, schedule=schedule,
                                     mask_id=mask_id, cache=cache, temperature=temperature,
                                     top_p=top_p, grid=grid, t_end=t_end)
  return _ancestral_jit(denoise, key, xt, t_grid, r_grid, spec=spec)
