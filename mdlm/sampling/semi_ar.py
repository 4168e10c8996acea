"""Semi-autoregressive generation of any length (Sahoo et al. 2024, MDLM section 4.2 / appendix).

A window of `window` positions is sampled with an inner sampler (ancestral or confidence); the
next window starts `stride` positions later, so its first window - stride positions are the clean
tail of the previous window (its prefix), and its last `stride` positions are new. The last window
is aligned to end at the requested length, so its prefix may be longer. Positions that are given
in xt (a prompt, fixed tokens) stay as they are; windows only fill masks. The denoiser sees one
window at a time, so under the confidence sampler its t is that of the window's masked fraction
(prefix included).

The whole window loop is one compiled lax.fori_loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm.sampling import ancestral_sampler as ancestral_lib
from mdlm.sampling import common, denoisers
from mdlm.sampling import confidence_sampler as confidence_lib

SAMPLERS = ("ancestral", "confidence")


def window_starts(length: int, window: int, stride: int) -> tuple[int, ...]:
  """Start of every window: 0, stride, 2 stride, ..., with the last one ending at `length`."""
  if length <= window:
    return (0,)
  count = 1 + -(-(length - window) // stride)
  return tuple(min(w * stride, length - window) for w in range(count))


def _semi_ar_impl(static_fn, fn_arrays, key, xt_BxN, t_grid, r_grid, *, spec, sampler, starts,
                  window):
  denoise = denoisers.combine(static_fn, fn_arrays)
  b = xt_BxN.shape[0]
  starts_W = jnp.asarray(starts, jnp.int32)

  def body(w, carry):
    x, nfe, windows_WxBxL = carry
    start = starts_W[w]
    xw = jax.lax.dynamic_slice(x, (0, start), (b, window))
    window_key = jax.random.fold_in(key, w)
    if sampler == "ancestral":
      out, stats = ancestral_lib._ancestral_loop(denoise, window_key, xw, t_grid, r_grid, spec)
    else:
      out, stats = confidence_lib._confidence_loop(denoise, window_key, xw, spec)
    x = jax.lax.dynamic_update_slice(x, out, (0, start))
    return x, nfe + stats["nfe"], windows_WxBxL.at[w].set(out)

  init = (xt_BxN, jnp.int32(0), jnp.zeros((len(starts), b, window), jnp.int32))
  x, nfe, windows = jax.lax.fori_loop(0, len(starts), body, init)
  return x, {"nfe": nfe, "steps": jnp.int32(spec.steps), "windows": windows}


_semi_ar_jit = common.jit_with_denoiser(
    _semi_ar_impl, static_argnames=("spec", "sampler", "starts", "window"))


def semi_autoregressive(key, denoise, xt, *, window: int, stride: int, sampler: str = "ancestral",
                        **settings):
  """Generates xt [B, N] (any N) window by window; settings go to the inner sampler.

  sampler="ancestral": steps, schedule, mask_id, cache, temperature, top_p, grid, t_end.
  sampler="confidence": steps, mask_id, block_length, threshold, temperature, remasking.
  `steps` is per window. Returns (tokens [B, N], stats) with stats["nfe"] (all windows),
  stats["windows"] [W, B, window] (each window's output) and stats["window_starts"].
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  for name, value in (("window", window), ("stride", stride)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  if stride > window:
    raise ValueError(f"stride={stride} exceeds window={window}; windows would leave gaps. Use "
                     "stride <= window (MDLM keeps window - stride tokens as the next prefix).")
  max_length = getattr(denoise, "max_length", None)
  if max_length is not None and window > max_length:
    raise ValueError(f"window={window} exceeds the model's maximum sequence length {max_length}; "
                     f"use window <= {max_length}.")
  if "mask_id" not in settings:
    raise ValueError("semi_autoregressive needs mask_id=...")
  mask_id = settings["mask_id"]
  # Validate the full sequence without the length limit (only windows must fit the model).
  xt = common.check_xt(xt, mask_id, _NoLimit(denoise))
  length = xt.shape[1]
  window = min(window, length)
  starts = window_starts(length, window, stride)
  probe = jnp.full((1, window), mask_id, jnp.int32)
  if sampler == "ancestral":
    defaults = dict(cache=True, temperature=1.0, top_p=1.0, grid="uniform", t_end=1e-5)
    kw = {**defaults, **settings}
    _, t_grid, r_grid, spec = ancestral_lib.prepare(probe, denoise, max_masked=window, **kw)
  else:
    defaults = dict(block_length=None, threshold=None, temperature=0.0,
                    remasking="low_confidence")
    kw = {**defaults, **settings}
    _, spec = confidence_lib.prepare(probe, denoise, max_masked=window, **kw)
    t_grid = r_grid = jnp.zeros((1,), jnp.float32)
  tokens, stats = _semi_ar_jit(denoise, key, xt, t_grid, r_grid, spec=spec, sampler=sampler,
                               starts=starts, window=window)
  stats["window_starts"] = starts
  return tokens, stats


class _NoLimit:
  """Exposes a denoiser's mask_id but not its max_length (for validating the whole sequence)."""

  def __init__(self, denoise):
    self.mask_id = getattr(denoise, "mask_id", None)
