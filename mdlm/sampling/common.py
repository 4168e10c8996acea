"""Checks and small pieces shared by the samplers (input validation runs before any compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mdlm.sampling import denoisers


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_steps(steps, name: str = "steps") -> int:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {steps!r}.")
  return int(steps)


def check_xt(xt_BxL, mask_id: int, denoise, *, what: str = "xt") -> jax.Array:
  """Validates the starting sequence (given tokens + mask_id where to fill). Returns int32."""
  if isinstance(mask_id, bool) or not isinstance(mask_id, (int, np.integer)) or mask_id < 0:
    raise ValueError(f"mask_id must be a non-negative integer, got {mask_id!r}.")
  own = getattr(denoise, "mask_id", None)
  if own is not None and int(own) != int(mask_id):
    raise ValueError(f"mask_id={mask_id} differs from the denoiser's mask_id={own}; pass "
                     f"mask_id={own} (for an mdlm model it is model.mask_id = vocab_size).")
  shape = jnp.shape(xt_BxL)
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"{what} must have shape [batch, length] with both >= 1, got {shape}; for "
                     "one sequence use xt[None].")
  if not jnp.issubdtype(jnp.result_type(xt_BxL), jnp.integer):
    raise ValueError(f"{what} must hold integer token ids, got dtype {jnp.result_type(xt_BxL)}.")
  max_length = getattr(denoise, "max_length", None)
  if max_length is not None and shape[1] > max_length:
    raise ValueError(
        f"length {shape[1]} exceeds the model's maximum sequence length {max_length}; ask for "
        f"length <= {max_length}, or use semi_autoregressive(..., window={max_length}) for longer "
        "text.")
  if is_concrete(xt_BxL):
    x = np.asarray(xt_BxL)
    if x.min() < 0 or x.max() > mask_id:
      raise ValueError(f"{what} holds ids outside [0, mask_id={mask_id}]: min {x.min()}, max "
                       f"{x.max()}.")
  return jnp.asarray(xt_BxL, jnp.int32)


def max_masked(xt_BxL, mask_id: int) -> int:
  """Most masked positions in any row (the length when xt is traced)."""
  if is_concrete(xt_BxL):
    return int(np.max(np.sum(np.asarray(xt_BxL) == mask_id, axis=1)))
  return int(jnp.shape(xt_BxL)[1])


def jit_with_denoiser(impl, static_argnames=()):
  """jax.jit of impl(static_fn, fn_arrays, *args, **kw) where (static_fn, fn_arrays) is a
  partitioned denoiser; returns call(denoise, *args, **kw)."""
  jitted = jax.jit(impl, static_argnames=("static_fn",) + tuple(static_argnames))

  def call(denoise, *args, **kw):
    static_fn, arrays = denoisers.partition(denoise)
    return jitted(static_fn, arrays, *args, **kw)

  return call


def gather_bits(bits_2xBxL, idx_BxS):
  """The random words (categorical.uniform_bits, [2, B, L]) of the positions idx: [2, B, S]."""
  return jnp.stack([denoisers.gather_rows(bits_2xBxL[0], idx_BxS),
                    denoisers.gather_rows(bits_2xBxL[1], idx_BxS)])


def scatter_rows(x_BxL, idx_BxS, values_BxS):
  """x[b, idx[b, s]] = values[b, s]; slots with idx = L are dropped."""
  rows_Bx1 = jnp.arange(idx_BxS.shape[0])[:, None]
  return x_BxL.at[rows_Bx1, idx_BxS].set(values_BxS.astype(x_BxL.dtype), mode="drop")


def compact(select_BxL, rank_BxL, start, size: int):
  """Positions whose rank lies in [start, start + size), as [B, size] indices (L = empty slot).

  rank is the 0-based order of the position among the selected ones of its row (left to right).
  """
  b, length = select_BxL.shape
  slot_BxL = jnp.where(select_BxL & (rank_BxL >= start) & (rank_BxL < start + size),
                       rank_BxL - start, size)
  pos_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  rows_Bx1 = jnp.arange(b)[:, None]
  return jnp.full((b, size), length, jnp.int32).at[rows_Bx1, slot_BxL].set(pos_BxL, mode="drop")
