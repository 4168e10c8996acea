"""Block-by-block sampling of a block-diffusion model with an exact KV cache (Arriola et al. 2025,
"Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models", BD3-LM).

The sequence is generated block by block (b tokens each, the model's training block size): the
masked positions of block k are filled by an existing sampler (ancestral, with its step skipping,
or confidence; `inner`) whose denoiser sees the noisy block at its absolute positions, attending
to itself and to the clean earlier blocks; then the finished block is run once more, clean, and
its keys and values are written into the cache (mdlm.models.kv_cache.forward_window). A clean
block's keys and values are thus computed exactly once and never recomputed: the denoiser's calls
inside a block cost a b-token window against the cache instead of a pass over the whole prefix.
This is the model's own computation regrouped (the clean half of the training pass attends
block-causally, the noisy block to its clean prefix), so it is exact: kv_cache=False recomputes
the prefix at every denoiser call and gives the same tokens (a test checks it).

Any length, and past the training length. The cache is a ring of `context` slots (default: the
training length L, a multiple of b): the noisy block at positions [s, s + b) sees the clean
positions [s - (context - b), s), the most a block saw in training (its query-key distances stay
below L). Rotary positions are absolute, and a query-key score depends only on their distance, so
the ring is exact for that sliding window; each clean block's keys were computed once, against
its own window (as in a sliding-window transformer, the receptive field grows with depth).
Positions past about 10^5 lose rotary precision in float32. kv_cache=False recomputes the window
[s + b - context, s + b) at every call: the same within the training length, a shallower context
past it.

Stopping: with eos_id, a row is finished once a *generated* position (not a given one) holds EOS;
the block loop (one lax.while_loop, compiled whole) stops when every row is finished, so output
has any length up to the requested one; stats["length"] is each row's length through its first
generated EOS (the positions after it are what the batch kept generating, or still masks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdlm.models import kv_cache as kv_lib
from mdlm.objectives.block import block_causal_mask
from mdlm.sampling import ancestral_sampler as ancestral_lib
from mdlm.sampling import common, denoisers
from mdlm.sampling import confidence_sampler as confidence_lib

INNER = ("ancestral", "confidence")


@dataclasses.dataclass(frozen=True)
class Spec:
  block_size: int
  num_blocks: int
  context: int          # cache slots (ring), a multiple of block_size
  inner: str
  inner_spec: Any       # the inner sampler's Spec
  kv_cache: bool
  mask_id: int
  eos_id: int           # -1: no stopping


class _CachedBlock:
  """The denoiser of one block: a b-token window at absolute positions [start, start + b) against
  the cache (write=False: the denoising steps never change it). Built inside the traced loop."""

  def __init__(self, model, cache, start, slot, visible_S, mask_id: int):
    self.model, self.cache, self.start, self.slot = model, cache, start, slot
    self.visible_S, self.mask_id = visible_S, mask_id
    self.time_conditioned = False

  def features(self, xt_BxW, t_B):
    del t_B  # the model is not time-conditioned (refused in `prepare`)
    _, hidden = kv_lib.forward_window(self.model, self.cache, xt_BxW, self.start,
                                      self.visible_S[None, None, :], write=False, slot=self.slot)
    return hidden

  def logits_at(self, hidden_BxWxD, positions_BxS):
    return self.model.logits(denoisers.gather_rows(hidden_BxWxD, positions_BxS))

  def __call__(self, xt_BxW, t_B):
    return self.model.logits(self.features(xt_BxW, t_B))


class _RecomputedBlock(_CachedBlock):
  """The same denoiser without a cache: every call runs the window of `context` tokens that ends
  with the block, under the block-causal mask (the clean prefix recomputed each time)."""

  def __init__(self, model, x_BxN, start, spec: Spec):
    super().__init__(model, None, start, None, None, spec.mask_id)
    self.x_BxN, self.spec = x_BxN, spec

  def features(self, xt_BxW, t_B):
    del t_B
    b, c = self.spec.block_size, self.spec.context
    first = jnp.maximum(self.start + b - c, 0)
    x = jax.lax.dynamic_update_slice(self.x_BxN, xt_BxW, (0, self.start))
    window = jax.lax.dynamic_slice(x, (0, first), (x.shape[0], c))
    mask = jnp.asarray(block_causal_mask(c, b))[None]
    hidden = self.model.hidden_states(window, None, causal=False,
                                      positions=first + jnp.arange(c), attention_mask=mask)
    return jax.lax.dynamic_slice(hidden, (0, self.start - first, 0),
                                 (x.shape[0], b, hidden.shape[-1]))


def _visible(slot_pos_S, start, slot, spec: Spec):
  """Cache slots the block at `start` (written at `slot`) attends to: the clean positions of the
  window [start - (context - b), start), and its own slots."""
  own = (jnp.arange(spec.context) >= slot) & (jnp.arange(spec.context) < slot + spec.block_size)
  clean = (slot_pos_S >= 0) & (slot_pos_S < start) & (
      slot_pos_S >= start - (spec.context - spec.block_size))
  return own | clean


def _fill_block(denoise, key, xb_BxW, t_grid, r_grid, spec: Spec):
  if spec.inner == "ancestral":
    return ancestral_lib._ancestral_loop(denoise, key, xb_BxW, t_grid, r_grid, spec.inner_spec)
  return confidence_lib._confidence_loop(denoise, key, xb_BxW, spec.inner_spec)


def _block_impl(static_fn, fn_arrays, key, xt_BxN, t_grid, r_grid, *, spec: Spec):
  model = denoisers.combine(static_fn, fn_arrays)._model()
  rows, length = xt_BxN.shape
  b, c = spec.block_size, spec.context
  cache = kv_lib.init_cache(model, rows, c, max_length=c) if spec.kv_cache else None
  if not spec.kv_cache and length < c:  # the recomputed window needs `context` positions
    xt_BxN = jnp.pad(xt_BxN, ((0, 0), (0, c - length)), constant_values=spec.mask_id)

  def body(carry):
    j, x, cache, slot_pos, nfe, length_B = carry
    start, slot = j * b, jnp.mod(j, c // b) * b
    xb = jax.lax.dynamic_slice(x, (0, start), (rows, b))
    visible = _visible(slot_pos, start, slot, spec)
    if spec.kv_cache:
      denoise = _CachedBlock(model, cache, start, slot, visible, spec.mask_id)
    else:
      denoise = _RecomputedBlock(model, x, start, spec)
    out, stats = _fill_block(denoise, jax.random.fold_in(key, j), xb, t_grid, r_grid, spec)
    if spec.kv_cache:  # the one clean pass of the finished block
      cache, _ = kv_lib.forward_window(model, cache, out, start, visible[None, None, :],
                                       slot=slot)
    slot_pos = jax.lax.dynamic_update_slice(slot_pos, start + jnp.arange(b, dtype=jnp.int32),
                                            (slot,))
    eos_W = (xb == spec.mask_id) & (out == spec.eos_id)
    first_B = jnp.where(jnp.any(eos_W, 1), start + jnp.argmax(eos_W, 1) + 1, length)
    length_B = jnp.where(length_B == length, first_B, length_B)
    x = jax.lax.dynamic_update_slice(x, out, (0, start))
    return j + 1, x, cache, slot_pos, nfe + stats["nfe"], length_B

  def cond(carry):
    return (carry[0] < spec.num_blocks) & jnp.any(carry[5] == length)

  init = (jnp.int32(0), xt_BxN, cache, jnp.full((c,), -1, jnp.int32), jnp.int32(0),
          jnp.full((rows,), length, jnp.int32))
  blocks, x, _, _, nfe, length_B = jax.lax.while_loop(cond, body, init)
  x = x[:, :length]
  if spec.eos_id < 0:
    length_B = jnp.full((rows,), length, jnp.int32)
  clean_passes = blocks if spec.kv_cache else jnp.int32(0)
  # Positions run through the trunk: b per cached call (denoising steps and clean passes), the
  # whole context window per recomputed call.
  positions = (nfe + clean_passes) * b if spec.kv_cache else nfe * c
  return x, {"nfe": nfe, "clean_passes": clean_passes, "blocks": blocks, "length": length_B,
             "steps": jnp.int32(_inner_steps(spec)), "positions": positions}


def _inner_steps(spec: Spec) -> int:
  return spec.inner_spec.steps


_block_jit = common.jit_with_denoiser(_block_impl, static_argnames=("spec",))


def prepare(xt_BxN, denoise, *, block_size, mask_id, inner="ancestral", context=None,
            kv_cache=True, eos_id=None, **settings):
  """Validates everything before any compile; returns (xt padded to whole blocks, t_grid,
  r_grid, spec)."""
  if not callable(getattr(denoise, "_model", None)):  # a ModelDenoiser (or a test's oracle)
    raise ValueError(f"the block sampler runs the model itself (its KV cache): pass "
                     f"denoiser_from_model(model), not a {type(denoise).__name__}.")
  if getattr(denoise, "time_conditioned", False):
    raise ValueError("the block sampler needs a model without time conditioning (a bd3lm run "
                     "trains without it); this model is time-conditioned: use sampler=ancestral.")
  if inner not in INNER:
    raise ValueError(f"sampler.inner={inner!r}; the block sampler fills each block with one of "
                     f"{INNER}.")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
      or not 1 <= block_size <= denoise.max_length:
    raise ValueError(f"block_size={block_size!r} must be an integer in [1, the model's "
                     f"max_seq_len={denoise.max_length}]; use the run's objective.block_size.")
  context = denoise.max_length if context is None else context
  if isinstance(context, bool) or not isinstance(context, (int, np.integer)) \
      or context % block_size or not block_size <= context <= denoise.max_length:
    raise ValueError(f"context={context!r} must be a multiple of block_size={block_size} in "
                     f"[{block_size}, max_seq_len={denoise.max_length}] (default: the training "
                     "length)")
  xt = common.check_xt(xt_BxN, mask_id, _MaskIdOnly(denoise))
  rows, length = xt.shape
  padded = -(-length // block_size) * block_size
  xt = jnp.pad(xt, ((0, 0), (0, padded - length)), constant_values=mask_id)
  probe = jnp.full((1, block_size), mask_id, jnp.int32)
  if inner == "ancestral":
    kw = dict(dict(cache=True, temperature=1.0, top_p=1.0, grid="uniform", t_end=1e-5), **settings)
    _, t_grid, r_grid, inner_spec = ancestral_lib.prepare(probe, denoise, mask_id=mask_id,
                                                         max_masked=block_size, **kw)
  else:
    kw = dict(dict(block_length=None, threshold=None, temperature=0.0,
                   remasking="low_confidence"), **settings)
    _, inner_spec = confidence_lib.prepare(probe, denoise, mask_id=mask_id, max_masked=block_size,
                                           **kw)
    t_grid = r_grid = jnp.zeros((1,), jnp.float32)
  spec = Spec(block_size=int(block_size), num_blocks=padded // block_size, context=int(context),
              inner=inner, inner_spec=inner_spec, kv_cache=bool(kv_cache), mask_id=int(mask_id),
              eos_id=-1 if eos_id is None else int(eos_id))
  return xt, t_grid, r_grid, spec


def block_sample(key, denoise, xt, *, block_size: int, mask_id: int, inner: str = "ancestral",
                 context: Optional[int] = None, kv_cache: bool = True,
                 eos_id: Optional[int] = None, **settings):
  """Samples xt [B, N] (any N; given tokens stay, mask_id is filled) block by block.

  denoise: a model denoiser (denoiser_from_model) of a model without time conditioning, usually
  a bd3lm run with its objective.block_size. inner: "ancestral" (settings: steps, schedule,
  cache, temperature, top_p, grid, t_end) or "confidence" (steps, block_length, threshold,
  temperature, remasking); `steps` is per block. context: cache slots (default the model's
  max_seq_len; pass the training length). kv_cache=False recomputes the prefix at every call.
  eos_id: stop once every row has generated EOS.

  Returns (tokens [B, N], stats) with stats["nfe"] (denoiser calls), stats["clean_passes"]
  (blocks written into the cache), stats["blocks"] (blocks generated), stats["length"] [B],
  stats["positions"] (positions run through the trunk) and stats["nfe_equiv"] (positions / N: the
  cost in full passes over the N tokens, as Fast-dLLM's samplers report it).
  """
  rows, length = jnp.shape(xt)[0], jnp.shape(xt)[-1]
  xt, t_grid, r_grid, spec = prepare(xt, denoise, block_size=block_size, mask_id=mask_id,
                                     inner=inner, context=context, kv_cache=kv_cache,
                                     eos_id=eos_id, **settings)
  tokens, stats = _block_jit(denoise, key, xt, t_grid, r_grid, spec=spec)
  stats["length"] = jnp.minimum(stats["length"], length)
  stats["nfe_equiv"] = stats["positions"].astype(jnp.float32) / length
  return tokens[:, :length], stats


class _MaskIdOnly:
  """Exposes a denoiser's mask_id but not its max_length (the sequence may be any length)."""

  def __init__(self, denoise):
    self.mask_id = getattr(denoise, "mask_id", None)
