"""The MARIA infiller: one denoiser pass, then KV-cached left-to-right decoding through the head.

Israel et al. 2025, "Enabling Autoregressive Models to Fill In Masked Tokens" (the head:
mdlm.models.hybrid). The denoiser sees xt once; then the AR model decodes left to right with its
KV cache (mdlm.models.ar): at a masked position the token is drawn from the head, elsewhere the
given token is fed. Optionally the denoiser states are recomputed every k filled tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mdlm.models import ar as ar_lib
from mdlm.models.hybrid import MariaHead


class InfillStats(NamedTuple):
  denoiser_passes: jax.Array  # 1 + refreshes
  ar_steps: jax.Array         # one-token AR decode steps
  num_filled: jax.Array       # masked positions filled


@nnx.jit
def _infill(head: MariaHead, key, xt_BxL, token_mask_BxL, temperature, top_p, refresh_every):
  batch, length = xt_BxL.shape
  mask_id = head.mask_id
  to_fill_BxL = (xt_BxL == mask_id) & token_mask_BxL
  has_mask_B = jnp.any(to_fill_BxL, axis=1)
  first_B = jnp.where(has_mask_B, jnp.argmax(to_fill_BxL, axis=1), length)
  last_B = jnp.where(has_mask_B, length - 1 - jnp.argmax(to_fill_BxL[:, ::-1], axis=1), -1)
  start, stop = jnp.min(first_B), jnp.max(last_B) + 1

  h_mlm = head.mlm_states(xt_BxL, None, token_mask_BxL)
  # Prefill the whole sequence: the states before `start` are exact (all given tokens); the cache
  # entries from `start` on are rewritten by the decode steps before any query reads them.
  cache = ar_lib.init_cache(head.ar, batch, length)
  cache, h_ar_all = ar_lib.prefill(head.ar, xt_BxL, cache)
  h_prev = jnp.where(start > 0, h_ar_all[:, jnp.maximum(start - 1, 0)], 0.0).astype(jnp.float32)

  def cond(state):
    return state[0] < stop

  def body(state):
    pos, x_BxL, cache, h_prev, h_mlm, filled_B, fill_steps, refreshes = state
    logits_BxV = head.combine(h_prev, jax.lax.dynamic_index_in_dim(h_mlm, pos, 1, False))
    drawn_B = ar_lib.sample_logits(jax.random.fold_in(key, pos), logits_BxV, temperature, top_p)
    fill_B = jax.lax.dynamic_index_in_dim(to_fill_BxL, pos, 1, False)
    given_B = jax.lax.dynamic_index_in_dim(x_BxL, pos, 1, False)
    token_B = jnp.where(fill_B, drawn_B, given_B).astype(x_BxL.dtype)
    x_BxL = jax.lax.dynamic_update_index_in_dim(x_BxL, token_B, pos, 1)
    cache, h_new = ar_lib.decode_step(head.ar, cache, token_B, pos)
    filled_B = filled_B + fill_B
    # Steps that fill at least one token, counted over the batch: a refresh every k of them keeps
    # every row's denoiser states at most k of its own fills old (exactly every k fills for one
    # sequence), without the batch refreshing whenever any single row reaches a multiple of k.
    filled_any = jnp.any(fill_B)
    fill_steps = fill_steps + filled_any
    refresh = ((refresh_every > 0) & (pos + 1 < stop) & filled_any
               & (fill_steps % jnp.maximum(refresh_every, 1) == 0))
    h_mlm = jax.lax.cond(refresh, lambda: head.mlm_states(x_BxL, None, token_mask_BxL),
                         lambda: h_mlm)
    return (pos + 1, x_BxL, cache, h_new.astype(jnp.float32), h_mlm, filled_B, fill_steps,
            refreshes + refresh)

  init = (start, xt_BxL, cache, h_prev, h_mlm, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  _, x_BxL, _, _, _, filled_B, _, refreshes = jax.lax.while_loop(cond, body, init)
  stats = InfillStats(1 + refreshes, jnp.maximum(stop - start, 0), jnp.sum(filled_B))
  return x_BxL, stats


def maria_infill(key, head: MariaHead, xt_BxL, *, mask_id: int, temperature: float = 1.0,
                 top_p: float = 1.0, refresh_every: int = 0, token_mask_BxL=None):
  """Fills every mask of xt_BxL with the MARIA head; returns (tokens_BxL, stats) with stats
  {"denoiser_passes" (= "nfe"), "ar_steps", "num_filled"}.

  Given tokens (and padding, where token_mask_BxL is False) are copied unchanged. temperature 0 is
  greedy. refresh_every = k > 0 recomputes the denoiser states on the partly filled sequence
  after every k decode steps that fill a token in some row (for one sequence: every k filled
  tokens; in a batch, no row's states are more than k of its fills old); 0 keeps the single
  initial pass.
  """
  if not isinstance(head, MariaHead):
    raise TypeError(f"expected a MariaHead, got {type(head).__name__}.")
  if mask_id != head.mask_id:
    raise ValueError(f"mask_id={mask_id} differs from the models' mask id {head.mask_id}.")
  xt = jnp.asarray(xt_BxL)
  if xt.ndim != 2 or not jnp.issubdtype(xt.dtype, jnp.integer):
    raise ValueError(f"xt must be integer token ids [batch, length]; got {xt.dtype} {xt.shape}.")
  if xt.shape[1] > head.max_seq_len:
    raise ValueError(f"sequence length {xt.shape[1]} exceeds the backbones' max_seq_len="
                     f"{head.max_seq_len}; infill a shorter window.")
  if xt.size and (int(xt.min()) < 0 or int(xt.max()) > mask_id):
    raise ValueError(f"token ids must lie in [0, {mask_id}] (the mask included); got "
                     f"[{int(xt.min())}, {int(xt.max())}].")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or refresh_every < 0:
    raise ValueError(f"need temperature >= 0, top_p in (0, 1], refresh_every >= 0; got "
                     f"{temperature}, {top_p}, {refresh_every}.")
  # An all-true mask rather than None: one compilation serves padded and unpadded batches.
  mask = (jnp.ones(xt.shape, bool) if token_mask_BxL is None
          else jnp.asarray(token_mask_BxL, bool))
  if mask.shape != xt.shape:
    raise ValueError(f"token_mask shape {mask.shape} differs from xt shape {xt.shape}.")
  tokens, stats = _infill(head, key, xt.astype(jnp.int32), mask, jnp.float32(temperature),
                          jnp.float32(top_p), jnp.int32(refresh_every))
  out = {k: int(v) for k, v in stats._asdict().items()}
  out["nfe"] = out["denoiser_passes"]  # the samplers' name for denoiser calls
  return tokens, out
