"""Key/value caches for any mdlm Transformer: run a window of positions against cached keys/values.

One primitive, `forward_window`, serves every cached computation in the codebase:

  AR decoding (mdlm.models.ar)      window = the prompt (causal), then one token at a time;
  block diffusion (BD3-LM)          window = the current noisy block, attending to the exact clean
                                    prefix cache and to itself; the clean block is written once
                                    when it is finished;
  Fast-dLLM prefix / dual caches    window = the current block (+ the suffix for the prefix
                                    cache), attending to keys that were cached at the block's
                                    start and are reused, approximately, for its steps.

`forward_window(model, cache, tokens_BxW, start, visible)` computes the window's queries, keys
and values at positions start..start+W-1 (rotary applied at those absolute positions), writes the
keys/values into the cache at those slots, and attends the queries to *all* cache slots, masked
by `visible` [B or 1, W or 1, S]. It runs the model's own modules (Attention.qkv / attend, the
blocks' norms, MLP and adaLN), so a window over the whole sequence with everything visible is
the model's uncached forward pass regrouped.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mdlm.models.transformer import Block, Transformer


class KVCache(NamedTuple):
  """Per-layer keys and values, each [B, S, K, H] in the compute dtype (rotary already applied;
  K = cfg.kv_heads, fewer than the query heads under grouped-query attention)."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def length(self) -> int:
    return self.k[0].shape[1]


def init_cache(model: Transformer, batch_size: int, length: int, *,
               max_length: Optional[int] = None) -> KVCache:
  """An all-zero cache of static shape [B, length, K, H] per layer (K = cfg.kv_heads).

  `max_length` bounds `length` (default: the model's max_seq_len); a caller that generates past
  the training length (block diffusion, whose rotary positions extend) passes its own bound."""
  cfg = model.cfg
  bound = cfg.max_seq_len if max_length is None else max_length
  if not 1 <= length <= bound:
    raise ValueError(f"cache length {length} must lie in [1, {bound}]; decode fewer tokens or "
                     "build the model with a larger max_seq_len.")
  shape = (batch_size, length, cfg.kv_heads, cfg.head_dim)
  zeros = tuple(jnp.zeros(shape, jnp.dtype(cfg.dtype)) for _ in range(cfg.num_layers))
  return KVCache(zeros, zeros)


def block_forward(block: Block, x_BxTxD, positions_T, attend, cond_BxC=None):
  """One block (the residual structure of Block.__call__, no dropout) whose attention is
  `attend(q, k, v) -> (out, k_cached, v_cached)`; returns (x, k_cached, v_cached)."""
  if block.ada is None:
    q, k, v = block.attn.qkv(block.norm_attn(x_BxTxD), positions_T)
    out, k_cached, v_cached = attend(q, k, v)
    x_BxTxD = x_BxTxD + out
    return x_BxTxD + block.mlp(block.norm_mlp(x_BxTxD)), k_cached, v_cached
  shift1, scale1, gate1, shift2, scale2, gate2 = (
      m.astype(x_BxTxD.dtype) for m in block.ada(cond_BxC))
  q, k, v = block.attn.qkv(block.norm_attn(x_BxTxD) * (1 + scale1) + shift1, positions_T)
  out, k_cached, v_cached = attend(q, k, v)
  x_BxTxD = x_BxTxD + gate1 * out
  h = block.norm_mlp(x_BxTxD) * (1 + scale2) + shift2
  return x_BxTxD + gate2 * block.mlp(h), k_cached, v_cached


def forward_window(model: Transformer, cache: KVCache, tokens_BxW, start, visible, *,
                   noise_level_B=None, write: bool = True, slot=None):
  """Runs tokens_BxW at positions start..start+W-1 against the cache; see the module docstring.

  start: a scalar (may be traced). visible: boolean, broadcastable to [B, W, S]: whether window
  query w may attend to cache slot s (the window's own slots hold its fresh keys). write=False
  attends to the fresh keys without keeping them (the returned cache is the input one).
  slot: the cache slot of the window's first key (default: start); a ring buffer (block
  diffusion past the training length) passes its own slot while the rotary positions stay
  absolute, which keeps every query-key score a function of their distance only.
  Returns (cache, hidden_BxWxD): final-norm states, to be mapped by model.logits.
  """
  batch, width = tokens_BxW.shape
  start = jnp.asarray(start, jnp.int32)
  slot = start if slot is None else jnp.asarray(slot, jnp.int32)
  positions_W = start + jnp.arange(width, dtype=jnp.int32)
  visible_Bx1xWxS = jnp.asarray(visible, bool)
  visible_Bx1xWxS = jnp.broadcast_to(visible_Bx1xWxS,
                                     (visible_Bx1xWxS.shape[0], width, cache.length))[:, None]
  cond = model.conditioning(noise_level_B, batch)
  x = model.embed_tokens(tokens_BxW)
  new_k, new_v = [], []
  for i, block in enumerate(model.layers()):
    def attend(q, k, v, block=block, i=i):
      k_all = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype),
                                           (0, slot, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype),
                                           (0, slot, 0, 0))
      out = block.attn.attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), visible_Bx1xWxS,
                              False)
      return (out, k_all, v_all) if write else (out, cache.k[i], cache.v[i])
    x, k_i, v_i = block_forward(block, x, positions_W, attend, cond)
    new_k.append(k_i)
    new_v.append(v_i)
  return KVCache(tuple(new_k), tuple(new_v)), model.final_hidden(x, cond)
