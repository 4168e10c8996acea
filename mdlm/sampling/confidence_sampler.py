"""Confidence-based remasking (Nie et al. 2025, "Large Language Diffusion Models", LLaDA) and the
confidence-threshold rule of Fast-dLLM (Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of
Diffusion LLM by Enabling KV Cache and Parallel Decoding").

Each step predicts every still-masked position of the current block (argmax, or an exact draw at
temperature > 0), scores it by the model probability of the prediction (or a uniform number for
random remasking), and commits the k highest-scoring predictions; the other positions stay masked.

Schedule (LLaDA's linear schedule): a block with m masked positions and s steps commits
floor(m / s) per step plus one more in each of the first m mod s steps. We compute it as
k_i = ceil(remaining_i / (s - i)) from the count still masked before step i, which gives the same
sequence (after i steps, remaining = (s - i) floor(m/s) + max(m mod s - i, 0)) and lets the
threshold rule below share it.

Threshold rule (Fast-dLLM): commit every candidate whose probability is >= tau, and at least the
scheduled k (k >= 1 while the block has masks), so a block always finishes within its steps.
With steps = block length this is Fast-dLLM's "at least the top-1".

Blocks (LLaDA's semi-autoregressive remasking): the masked positions of each row, in left-to-right
order, form consecutive blocks of `block_length`; block j is finished before block j + 1 starts.
For a prompt followed by a generation span this is LLaDA's layout. `steps` is spread over the
blocks as evenly as possible (LLaDA requires steps divisible by the number of blocks; we do not).
Each step the denoiser's trunk runs over the whole sequence, but the output head and the
softmax over V (most of a small model's cost) run only at the candidates: the current block's
still-masked positions, compacted into the narrowest of a few static slab widths
(`denoisers.stages`, `_slab_sizes`).

Time. The sampler has no time grid: a time-conditioned denoiser is called at the t whose mask
probability schedule.mask_prob(t) = 1 - alpha(t) equals the fraction of the sequence's tokens
still masked (all positions, given ones included: the noise level the model was trained on is
over every real token), through the inverse of the denoiser's schedule
(`denoisers.at_masked_fraction`). Under guidance each branch gets the t of its own input.

A step at which no row has anything to commit (the block is finished: under the threshold rule,
or when a block has fewer masked positions than steps) does not call the denoiser: the loop jumps
to the next step with work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdlm.sampling import common, denoisers
from mdlm import categorical

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class Spec:
  steps: int
  mask_id: int
  block_length: int              # positions per block (<= max masked positions per row)
  block_of_step: tuple           # block index of every step
  step_in_block: tuple           # index of every step inside its block
  steps_in_block: tuple          # steps given to each block
  threshold: Optional[float]
  temperature: float
  remasking: str
  slab_sizes: tuple = ()         # static slab widths, largest first (see _slab_sizes)


def _slab_sizes(block_length: int, smallest: int = 8) -> tuple:
  """Widths block_length, ceil(block_length / 2), ... down to `smallest`: a step works on the
  narrowest one that holds every row's candidates, so the output head and the softmax over V run
  at about 4/3 of the fullest row's still-masked count on average rather than at the whole
  block. Each width is one branch of a lax.switch (compiled once each, about log2 of the block)."""
  sizes = [block_length]
  while sizes[-1] > smallest:
    sizes.append(max(smallest, -(-sizes[-1] // 2)))
  return tuple(sizes)


def _predict(logits_BxSxV, bits_2xBxS, spec: Spec):
  """Predicted tokens and their log-probabilities under the model at a slab of positions."""
  b, s, v = logits_BxSxV.shape
  logits_NxV = categorical.subs_logits(logits_BxSxV.reshape(b * s, v), spec.mask_id)
  # Two passes over the [N, V] logits in all: the block maxima (which give the max and argmax)
  # and the exp-sum of the normaliser.
  top_N, argmax_N = categorical.max_and_argmax(logits_NxV)
  log_norm_N = top_N + jnp.log(jnp.sum(jnp.exp(logits_NxV - top_N[:, None]), axis=-1))
  # The score is the untempered model probability of the prediction (as LLaDA), kept in log
  # space: monotone in the probability, so ranks and the tau comparison are unchanged.
  if spec.temperature == 0.0:
    tokens_N, chosen_N = argmax_N, top_N
  else:
    tokens_N = categorical.draw(logits_NxV, bits_2xBxS.reshape(2, b * s), temperature=spec.temperature,
                          top_p=1.0)
    chosen_N = jnp.take_along_axis(logits_NxV, tokens_N[:, None], axis=-1)[:, 0]
  return tokens_N.reshape(b, s), (chosen_N - log_norm_N).reshape(b, s)


def _chosen(score_BxS, log_conf_BxS, valid_BxS, k_B, log_tau):
  """The k_B best-scored valid slots of each row (ties: the leftmost first); with a threshold
  (Fast-dLLM), also every valid slot whose confidence reaches it."""
  score_BxS = jnp.where(valid_BxS, score_BxS, -jnp.inf)
  order_BxS = jnp.argsort(-score_BxS, axis=1, stable=True)
  rank_BxS = jnp.argsort(order_BxS, axis=1, stable=True)
  count_B = k_B
  if log_tau is not None:
    count_B = jnp.maximum(k_B, jnp.sum(valid_BxS & (log_conf_BxS >= log_tau), axis=1))
  return valid_BxS & (rank_BxS < count_B[:, None])


def _log_tau(spec: Spec):
  return None if spec.threshold is None else float(np.log(spec.threshold))


def blocks_of(xt_BxL, spec: Spec):
  """The block of each initially masked position, by its rank among its row's masked positions
  (len(spec.steps_in_block) for the given ones)."""
  masked0_BxL = xt_BxL == spec.mask_id
  rank0_BxL = jnp.cumsum(masked0_BxL, axis=1, dtype=jnp.int32) - 1
  return jnp.where(masked0_BxL, rank0_BxL // spec.block_length, len(spec.steps_in_block))


def _commit(spec: Spec, logits_at, size, features, x, fill_BxL, candidate_BxL, k_B, step_key, i):
  """Predicts the candidates, compacted left to right into a [B, size] slab, and commits the
  count_B best of each row. Random numbers are drawn per position of the sequence, so with a
  plain denoiser the result does not depend on the slab width (a two-stage one only through
  float rounding of the head at another width)."""
  b, length = x.shape
  rank_BxL = jnp.cumsum(candidate_BxL, axis=1, dtype=jnp.int32) - 1
  idx_BxS = common.compact(candidate_BxL, rank_BxL, 0, size)
  valid_BxS = idx_BxS < length
  bits_2xBxS = None
  if spec.temperature > 0.0:
    bits_2xBxL = categorical.uniform_bits(jax.random.fold_in(step_key, 0), (b, length))
    bits_2xBxS = common.gather_bits(bits_2xBxL, idx_BxS)
  tokens_BxS, log_conf_BxS = _predict(logits_at(features, idx_BxS), bits_2xBxS, spec)
  if spec.remasking == "random":
    u_BxL = jax.random.uniform(jax.random.fold_in(step_key, 1), (b, length))
    score_BxS = denoisers.gather_rows(u_BxL, idx_BxS)
  else:
    score_BxS = log_conf_BxS
  chosen_BxS = _chosen(score_BxS, log_conf_BxS, valid_BxS, k_B, _log_tau(spec))
  target_BxS = jnp.where(chosen_BxS, idx_BxS, length)  # L: dropped by the scatter
  x = common.scatter_rows(x, target_BxS, tokens_BxS)
  fill_BxL = common.scatter_rows(fill_BxL, target_BxS, jnp.full((b, size), i + 1, jnp.int32))
  return x, fill_BxL, jnp.sum(chosen_BxS, axis=1, dtype=jnp.int32)


def decode_step(spec: Spec, logits_at, block_BxL, features, key, i, x, fill_BxL, commits_SxB,
                width_S):
  """Step i given the denoiser's features of x (read by logits_at at sequence positions): the
  still-masked positions of step i's block are the candidates, the scheduled count (at least)
  of them is committed. Returns (x, fill_BxL, commits_SxB, width_S), updated."""
  candidate_BxL = (x == spec.mask_id) & (block_BxL == jnp.asarray(spec.block_of_step)[i])
  remaining_B = jnp.sum(candidate_BxL, axis=1, dtype=jnp.int32)
  steps_left = (jnp.asarray(spec.steps_in_block, jnp.int32)[jnp.asarray(spec.block_of_step)[i]]
                - jnp.asarray(spec.step_in_block, jnp.int32)[i])
  k_B = (remaining_B + steps_left - 1) // steps_left  # LLaDA's linear schedule
  # The narrowest slab that holds every row's candidates.
  sizes = jnp.asarray(spec.slab_sizes, jnp.int32)
  branch = jnp.sum(sizes >= jnp.max(remaining_B)) - 1
  branches = [functools.partial(_commit, spec, logits_at, size) for size in spec.slab_sizes]
  x, fill_BxL, commits_B = jax.lax.switch(branch, branches, features, x, fill_BxL,
                                          candidate_BxL, k_B, jax.random.fold_in(key, i), i)
  return x, fill_BxL, commits_SxB.at[i].set(commits_B), width_S.at[i].set(sizes[branch])


def next_active_step(spec: Spec, block_BxL, after, x):
  """The first step > after whose block still has a masked position in some row (spec.steps
  if none). The other steps would commit nothing: the loop jumps over them instead of testing
  every step with a lax.cond, which on a CPU costs a tenth of a small model's forward pass."""
  num_blocks = len(spec.steps_in_block)
  still_J = jax.ops.segment_sum((x == spec.mask_id).astype(jnp.int32).reshape(-1),
                                block_BxL.reshape(-1), num_segments=num_blocks + 1)
  active_S = ((still_J[jnp.asarray(spec.block_of_step, jnp.int32)] > 0)
              & (jnp.arange(spec.steps, dtype=jnp.int32) > after))
  return jnp.where(jnp.any(active_S), jnp.argmax(active_S), spec.steps).astype(jnp.int32)


def _confidence_loop(denoise, key, xt_BxL, spec: Spec):
  b, length = xt_BxL.shape
  # A time-conditioned model sees the t whose mask probability is its input's masked fraction.
  features_of, logits_at = denoisers.stages(denoisers.at_masked_fraction(denoise, spec.mask_id))
  block_BxL = blocks_of(xt_BxL, spec)
  next_active = functools.partial(next_active_step, spec, block_BxL)

  def step(carry):
    i, x, nfe, commits_SxB, fill_BxL, width_S = carry
    # The wrapper replaces this t by the schedule's time of the same masked fraction.
    features = features_of(x, jnp.mean(x == spec.mask_id, axis=1, dtype=jnp.float32))
    x, fill_BxL, commits_SxB, width_S = decode_step(spec, logits_at, block_BxL, features, key, i,
                                                    x, fill_BxL, commits_SxB, width_S)
    return next_active(i, x), x, nfe + 1, commits_SxB, fill_BxL, width_S

  init = (next_active(-1, xt_BxL), xt_BxL, jnp.int32(0),
          jnp.zeros((spec.steps, b), jnp.int32), jnp.zeros((b, length), jnp.int32),
          jnp.zeros((spec.steps,), jnp.int32))
  _, x, nfe, commits_SxB, fill_BxL, width_S = jax.lax.while_loop(
      lambda c: c[0] < spec.steps, step, init)
  return x, {"nfe": nfe, "steps": jnp.int32(spec.steps), "commits": commits_SxB,
             "fill_step": fill_BxL, "slab_width": width_S}


def _confidence_impl(static_fn, fn_arrays, key, xt_BxL, *, spec: Spec):
  return _confidence_loop(denoisers.combine(static_fn, fn_arrays), key, xt_BxL, spec)


_confidence_jit = common.jit_with_denoiser(_confidence_impl, static_argnames=("spec",))


def prepare(xt_BxL, denoise, *, steps, mask_id, block_length, threshold, temperature, remasking,
            max_masked=None):
  steps = common.check_steps(steps)
  categorical.validate(temperature, 1.0)
  if remasking not in REMASKING:
    raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}.")
  if threshold is not None:
    if not 0.0 < threshold <= 1.0:
      raise ValueError(f"threshold must lie in (0, 1] (Fast-dLLM uses 0.9), got {threshold}.")
    if remasking != "low_confidence":
      raise ValueError("the confidence threshold needs remasking='low_confidence'.")
  xt_BxL = common.check_xt(xt_BxL, mask_id, denoise)
  masked = max(1, common.max_masked(xt_BxL, mask_id) if max_masked is None else max_masked)
  if block_length is None:
    block_length = masked
  if isinstance(block_length, bool) or not isinstance(block_length, (int, np.integer)) \
      or block_length < 1:
    raise ValueError(f"block_length must be an integer >= 1 or None, got {block_length!r}.")
  block_length = min(int(block_length), masked)
  num_blocks = -(-masked // block_length)
  if steps < num_blocks:
    raise ValueError(f"steps={steps} is fewer than the {num_blocks} blocks of {block_length} "
                     f"masked positions; use steps >= {num_blocks} or a larger block_length.")
  per_block = [steps // num_blocks + (j < steps % num_blocks) for j in range(num_blocks)]
  block_of_step = tuple(j for j, n in enumerate(per_block) for _ in range(n))
  step_in_block = tuple(i for n in per_block for i in range(n))
  spec = Spec(steps=steps, mask_id=int(mask_id), block_length=block_length,
              block_of_step=block_of_step, step_in_block=step_in_block,
              steps_in_block=tuple(per_block),
              threshold=None if threshold is None else float(threshold),
              temperature=float(temperature), remasking=remasking,
              slab_sizes=_slab_sizes(block_length))
  return xt_BxL, spec


def confidence(key, denoise, xt, *, steps: int, mask_id: int, block_length: Optional[int] = None,
               threshold: Optional[float] = None, temperature: float = 0.0,
               remasking: str = "low_confidence"):
  """Fills the masked positions of xt [B, L] by confidence-based remasking in `steps` steps.

  block_length: masked positions per semi-autoregressive block (None: one block).
  threshold: Fast-dLLM rule, commit every prediction with probability >= threshold (and at least
    the scheduled count). temperature: 0 = argmax predictions, > 0 = exact tempered draws.
  remasking: "low_confidence" (keep the most probable) or "random" (LLaDA's random remasking).
  A time-conditioned denoiser is called at the t whose mask probability under its `schedule` is
  the fraction of the sequence still masked (module docstring, Time).

  Returns (tokens, stats): stats["nfe"], stats["steps"], stats["commits"] [steps, B] (tokens
  committed per step), stats["fill_step"] [B, L] (1-based step that filled each position; 0 if
  given) and stats["slab_width"] [steps] (positions the output head ran at; 0: step skipped).
  """
  xt, spec = prepare(xt, denoise, steps=steps, mask_id=mask_id, block_length=block_length,
                     threshold=threshold, temperature=temperature, remasking=remasking)
  return _confidence_jit(denoise, key, xt, spec=spec)
