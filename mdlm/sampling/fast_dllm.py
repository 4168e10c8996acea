"""Approximate key/value caches for full-attention denoisers (Wu et al. 2025, "Fast-dLLM:
Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding"), on the
confidence sampler (mdlm.sampling.confidence_sampler: LLaDA's low-confidence remasking in
semi-autoregressive blocks, and Fast-dLLM's confidence threshold).

A bidirectional denoiser has no exact KV cache: every position attends to every other, so a token
committed anywhere changes the keys and values of every position in the next pass. Fast-dLLM
observes that within one block of the semi-autoregressive schedule the keys and values outside
the block barely change, and reuses them:

  at a block boundary   one full pass over the whole sequence; its predictions serve the block's
                        first step (exactly the uncached step) and its keys/values, of every layer
                        at every position, fill the cache;
  prefix cache          each further step of the block recomputes the block and everything after
                        it, attending to the cached keys/values of the positions before the block
                        (the committed prefix);
  dual cache            each further step recomputes only the block, attending to the cached
                        prefix and to the cached suffix (the masked positions after the block).

The cache is refreshed at every block boundary (Fast-dLLM) and, with kv_refresh = r > 0, also at
every r-th step inside a block; kv_refresh = 1 refreshes at every step and is the uncached
sampler exactly. The cached passes are the denoiser's own capability (`kv_fill` / `kv_window`,
mdlm.sampling.denoisers; an mdlm model denoiser has them, also under guidance), so the loop
stays model-agnostic and jit-compiled.

Windows. Blocks are those of the confidence sampler: block j holds the masked positions of rank
j*block_length .. (j+1)*block_length - 1 of each row. Block j's window is the narrowest span of
positions holding its positions in every row, [lo_j, hi_j): for a prompt followed by the
generation (the same prompt length in every row) it is exactly Fast-dLLM's block. The dual cache
recomputes [lo_j, hi_j), the prefix cache [lo_j, L). Windows are static shapes, so they are fixed
from the starting sequence before compiling (one compile per mask layout); the loop is the
confidence sampler's single while loop, its pass a lax.switch between the full pass and one branch
per distinct window width (the dual cache: one; the prefix cache: one per block).

Exact cases (tests/test_fast_dllm.py). Only the block's tokens change inside a block, so nothing
cached is stale, and the cached sampler is the uncached one token for token, when: the cache is
refreshed every step (kv_refresh = 1, a traced setting: no recompile); a block's window starts at
position 0 and runs to the end (one block, no prompt); keys and values depend on their own
position's token only (a single attention layer). When nothing follows the block (it ends the
sequence) the dual cache is the prefix cache.

Cost (NFE). stats["nfe"] counts denoiser calls (full or cached); stats["nfe_equiv"] counts
positions run through the trunk divided by the length L: a full pass is 1, a cached step over a
window of W positions is W / L (its projections, MLP and attention queries are W of L; its
attention reads all L keys). Both leave out the output head, which every sampler here runs only
at the current block's candidates.

Time conditioning. Fast-dLLM's models (LLaDA, Dream) and this codebase's default denoiser have
none. A time-conditioned model is supported: every pass runs at the time of the whole sequence's
masked fraction at that step (as the uncached sampler), and the cached keys/values keep the time
of the pass that computed them, one more part of the approximation that a refresh removes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdlm.sampling import common, confidence_sampler, denoisers

KV_CACHES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  base: confidence_sampler.Spec
  kind: str          # "prefix" or "dual"
  windows: tuple     # (start, width) of every block: the positions a cached step recomputes


def block_windows(xt_BxL, spec: confidence_sampler.Spec, kind: str) -> tuple:
  """(start, width) per block: [lo_j, hi_j) for the dual cache, [lo_j, L) for the prefix cache
  (module docstring, Windows); xt is concrete."""
  x = np.asarray(xt_BxL)
  length = x.shape[1]
  masked_BxL = x == spec.mask_id
  block_BxL = np.where(masked_BxL, (np.cumsum(masked_BxL, axis=1) - 1) // spec.block_length, -1)
  windows = []
  for j in range(len(spec.steps_in_block)):
    cols = np.nonzero(np.any(block_BxL == j, axis=0))[0]
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    windows.append((lo, (length if kind == "prefix" else hi) - lo))
  return tuple(windows)


def _check_kv(kv_cache, kv_refresh, block_length, denoise, xt_BxL) -> None:
  """The refusals of the cached path, before anything compiles."""
  if kv_cache not in KV_CACHES:
    raise ValueError(f"kv_cache must be one of {KV_CACHES} (Fast-dLLM's prefix or dual cache), "
                     f"got {kv_cache!r}.")
  if isinstance(kv_refresh, bool) or not isinstance(kv_refresh, (int, np.integer)) \
      or kv_refresh < 0:
    raise ValueError(f"kv_refresh must be an integer >= 0 (0: refresh the cache at block "
                     f"boundaries only; r: also every r steps), got {kv_refresh!r}.")
  if kv_cache == "none":
    if kv_refresh:
      raise ValueError(f"kv_refresh={kv_refresh} refreshes a KV cache, but kv_cache='none'; set "
                       "kv_cache='prefix' or 'dual', or kv_refresh=0.")
    return
  if block_length is None:
    raise ValueError(f"kv_cache={kv_cache!r} needs block_length: the cache is refreshed at block "
                     "boundaries (Fast-dLLM uses 32); for one block over the whole generation "
                     "set block_length to its length.")
  if not denoisers.has_kv_cache(denoise):
    raise ValueError(f"kv_cache={kv_cache!r} needs a denoiser with keys and values to cache "
                     f"(kv_fill / kv_window: an mdlm model from denoiser_from_model, optionally "
                     f"guided); {type(denoise).__name__} has none. Use kv_cache='none'.")
  if not common.is_concrete(xt_BxL):
    raise ValueError("kv_cache fixes each block's window from the starting sequence before "
                     "compiling: pass a concrete xt (not a traced array).")


def prepare(xt_BxL, denoise, *, kv_cache: str, kv_refresh: int = 0, **settings):
  """(xt, CacheSpec) for the cached path; settings: those of confidence_sampler.prepare."""
  _check_kv(kv_cache, kv_refresh, settings.get("block_length"), denoise, xt_BxL)
  if kv_cache == "none":
    raise ValueError("prepare builds the cached path; kv_cache='none' is the confidence sampler.")
  xt_BxL, spec = confidence_sampler.prepare(xt_BxL, denoise, **settings)
  return xt_BxL, CacheSpec(base=spec, kind=kv_cache, windows=block_windows(xt_BxL, spec, kv_cache))


def _pass(cs: CacheSpec, denoise, j, due, cache, x, t_B):
  """(cache, features [B, L, D]) of one step of block j: a full pass refilling the cache when due,
  else block j's window against the cache, placed at its positions (the rest zeros, never read).
  One lax.switch branch per distinct window width (the window's start is traced)."""
  widths = sorted({w for _, w in cs.windows})
  start_J = jnp.asarray([a for a, _ in cs.windows], jnp.int32)
  width_J = jnp.asarray([widths.index(w) for _, w in cs.windows], jnp.int32)

  def refill(cache):
    return denoise.kv_fill(x, t_B)

  def reuse(width, cache):
    features = denoise.kv_window(cache, x, start_J[j], width, t_B)
    shape = features.shape[:1] + x.shape[1:] + features.shape[2:]
    placed = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, features.dtype), features,
                                                 start_J[j], axis=1)
    return cache, placed

  branches = [refill] + [functools.partial(reuse, w) for w in widths]
  return jax.lax.switch(jnp.where(due, 0, 1 + width_J[j]), branches, cache)


def _cached_loop(denoise, key, xt_BxL, refresh, cs: CacheSpec):
  """The confidence sampler's loop (steps of finished blocks skipped) whose features come from
  `_pass`: a refill at the first step of every block (and every refresh-th step of a block if
  refresh > 0; traced, so a setting does not recompile), else a window."""
  spec = cs.base
  b, length = xt_BxL.shape
  # A time-conditioned model sees the t whose mask probability is its input's masked fraction.
  denoise = denoisers.at_masked_fraction(denoise, spec.mask_id)
  _, logits_at = denoisers.stages(denoise)
  block_BxL = confidence_sampler.blocks_of(xt_BxL, spec)
  next_active = functools.partial(confidence_sampler.next_active_step, spec, block_BxL)
  block_of_step = jnp.asarray(spec.block_of_step, jnp.int32)
  step_in_block = jnp.asarray(spec.step_in_block, jnp.int32)
  width_J = jnp.asarray([w for _, w in cs.windows], jnp.int32)

  def step(carry):
    i, cache, x, fill_BxL, commits_SxB, width_S, calls, refreshes, positions = carry
    j = block_of_step[i]
    # A block's first step always has work (only its own steps fill it): its boundary refresh.
    due = jnp.where(refresh > 0, step_in_block[i] % jnp.maximum(refresh, 1) == 0,
                    step_in_block[i] == 0)
    t_B = jnp.mean(x == spec.mask_id, axis=1, dtype=jnp.float32)  # the wrapper's time instead
    cache, features = _pass(cs, denoise, j, due, cache, x, t_B)
    x, fill_BxL, commits_SxB, width_S = confidence_sampler.decode_step(
        spec, logits_at, block_BxL, features, key, i, x, fill_BxL, commits_SxB, width_S)
    return (next_active(i, x), cache, x, fill_BxL, commits_SxB, width_S, calls + 1,
            refreshes + due, positions + jnp.where(due, length, width_J[j]))

  t0_B = jnp.zeros((b,), jnp.float32)
  shapes = jax.eval_shape(lambda x: denoise.kv_fill(x, t0_B)[0], xt_BxL)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  init = (next_active(-1, xt_BxL), cache, xt_BxL, jnp.zeros((b, length), jnp.int32),
          jnp.zeros((spec.steps, b), jnp.int32), jnp.zeros((spec.steps,), jnp.int32),
          jnp.int32(0), jnp.int32(0), jnp.int32(0))
  out = jax.lax.while_loop(lambda c: c[0] < spec.steps, step, init)
  x, fill_BxL, commits_SxB, width_S, calls, refreshes, positions = out[2:]
  return x, {"nfe": calls, "steps": jnp.int32(spec.steps), "commits": commits_SxB,
             "fill_step": fill_BxL, "slab_width": width_S, "refreshes": refreshes,
             "positions": positions, "nfe_equiv": positions.astype(jnp.float32) / length}


def _cached_impl(static_fn, fn_arrays, key, xt_BxL, refresh, *, cspec: CacheSpec):
  return _cached_loop(denoisers.combine(static_fn, fn_arrays), key, xt_BxL, refresh, cspec)


_cached_jit = common.jit_with_denoiser(_cached_impl, static_argnames=("cspec",))


def cached_confidence(key, denoise, xt, *, steps: int, mask_id: int, kv_cache: str = "dual",
                      kv_refresh: int = 0, block_length: Optional[int] = None,
                      threshold: Optional[float] = None, temperature: float = 0.0,
                      remasking: str = "low_confidence"):
  """The confidence sampler (confidence_sampler.confidence, same arguments) with Fast-dLLM's
  prefix or dual KV cache (module docstring), refreshed at block boundaries and, with
  kv_refresh = r > 0, every r steps inside a block. kv_cache='none' is the uncached sampler.

  Returns (tokens, stats): those of the confidence sampler, and for a cache stats["refreshes"]
  (full passes), stats["positions"] (positions run through the trunk) and stats["nfe_equiv"]
  (positions / L); stats["nfe"] counts every call, full or cached.
  """
  settings = dict(steps=steps, mask_id=mask_id, block_length=block_length, threshold=threshold,
                  temperature=temperature, remasking=remasking)
  _check_kv(kv_cache, kv_refresh, block_length, denoise, xt)
  if kv_cache == "none":
    return confidence_sampler.confidence(key, denoise, xt, **settings)
  xt, cspec = prepare(xt, denoise, kv_cache=kv_cache, kv_refresh=kv_refresh, **settings)
  return _cached_jit(denoise, key, xt, jnp.int32(kv_refresh), cspec=cspec)
