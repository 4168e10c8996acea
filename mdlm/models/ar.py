"""KV-cached autoregressive decoding for the causal model (kind "ar").

A decode runs in two phases, both under `jax.jit` (the cache itself: mdlm.models.kv_cache):
  prefill      the prompt's P tokens in one causal pass; their keys and values are written into a
               cache of static length S (the total length to be decoded, <= cfg.max_seq_len);
  decode_step  one token at position `pos`: its query attends to cache entries 0..pos only.
Both reuse the model's own pieces (Block norms and MLP, Attention.qkv / Attention.attend,
Transformer.embed_tokens / final_hidden / logits), so the cached computation is the uncached
forward pass regrouped; tests/test_hybrid.py checks equality position by position.

Sampling (`sample_logits`) is greedy at temperature 0, else temperature + nucleus (top-p; Holtzman
et al. 2020, "The Curious Case of Neural Text Degeneration") with the exact float64 inverse-CDF
draw of mdlm.categorical (float32 Gumbel noise would truncate the tail).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mdlm.models.kv_cache import KVCache, block_forward, forward_window, init_cache
from mdlm.models.transformer import Transformer
from mdlm import categorical


def check_causal(model: Transformer) -> None:
  if not isinstance(model, Transformer):
    raise TypeError(f"expected an mdlm Transformer, got {type(model).__name__}.")
  if not model.cfg.causal:
    raise ValueError(f"KV-cached decoding needs a causal model (kind='ar'); got kind="
                     f"{model.cfg.kind!r}.")
  if model.cfg.time_conditioning:
    raise ValueError("KV-cached decoding supports AR models without time conditioning; build the "
                     "AR model with time_conditioning=False.")


def prefill(model: Transformer, tokens_BxP, cache: KVCache):
  """Runs the prompt through the model causally and writes its keys/values at positions 0..P-1.

  Returns (cache, hidden_BxPxD): the final-norm hidden states of all prompt positions, whose
  model.logits(...) equal the uncached forward's logits there.
  """
  length = tokens_BxP.shape[1]
  if length > cache.length:
    raise ValueError(f"prompt length {length} exceeds the cache length {cache.length}.")
  positions_P = jnp.arange(length)
  x = model.embed_tokens(tokens_BxP)
  new_k, new_v = [], []
  for i, block in enumerate(model.layers()):
    def attend(q, k, v, block=block, i=i):
      out = block.attn.attend(q, k, v, None, True)
      k_cache = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, 0, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, 0, 0, 0))
      return out, k_cache, v_cache
    x, k_i, v_i = block_forward(block, x, positions_P, attend)
    new_k.append(k_i)
    new_v.append(v_i)
  return KVCache(tuple(new_k), tuple(new_v)), model.final_hidden(x)


def decode_step(model: Transformer, cache: KVCache, token_B, position):
  """Feeds one token per row at `position` (a scalar, possibly traced) and caches its keys/values.

  The query attends to cache entries 0..position (entries beyond are stale or zero and masked).
  Returns (cache, hidden_BxD), the final-norm hidden state at `position`.
  """
  position = jnp.asarray(position, jnp.int32)
  visible_1x1xS = (jnp.arange(cache.length) <= position)[None, None, :]
  cache, hidden_Bx1xD = forward_window(model, cache, jnp.asarray(token_B)[:, None], position,
                                       visible_1x1xS)
  return cache, hidden_Bx1xD[:, 0]


def sample_logits(key, logits_BxV, temperature, top_p):
  """One token per row: argmax if temperature <= 0, else an exact draw from
  softmax(logits / temperature) restricted to the smallest set of most probable tokens whose mass
  reaches top_p (always >= 1 token; ties at the boundary kept).

  temperature and top_p may be traced scalars, so changing them does not recompile. The draw is
  mdlm.categorical's float64 inverse-CDF sampler.
  """
  logits = jnp.asarray(logits_BxV, jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def nucleus(scaled):
    probs = jax.nn.softmax(scaled, axis=-1)
    sorted_desc = -jnp.sort(-probs, axis=-1)
    # A sorted token is kept if the mass strictly before it is below top_p; the first always is.
    kept = (jnp.cumsum(sorted_desc, axis=-1) - sorted_desc) < top_p
    threshold_Bx1 = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold_Bx1, scaled, -jnp.inf)

  def draw(logits):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    # lax.cond: the sort over V runs only when a nucleus is asked for.
    filtered = jax.lax.cond(top_p < 1.0, nucleus, lambda z: z, scaled)
    return categorical.inverse_cdf(filtered, categorical.uniform_bits(key, logits.shape[:1]))

  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, draw, greedy, logits).astype(jnp.int32)


def _check_prompt(model: Transformer, prompt_BxP, max_new_tokens: int):
  cfg = model.cfg
  prompt = jnp.asarray(prompt_BxP)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must have shape [batch, length >= 1], got {prompt.shape}.")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}.")
  length = prompt.shape[1]
  if length > cfg.max_seq_len:
    raise ValueError(f"prompt length {length} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                     "shorten the prompt (e.g. keep its last max_seq_len tokens).")
  if max_new_tokens < 1 or length + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f"prompt length {length} + max_new_tokens {max_new_tokens} must lie in [{length + 1}, "
        f"max_seq_len={cfg.max_seq_len}]; lower max_new_tokens or shorten the prompt.")
  if prompt.size and (int(prompt.min()) < 0 or int(prompt.max()) >= cfg.vocab_size):
    raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}); got "
                     f"[{int(prompt.min())}, {int(prompt.max())}].")
  return prompt.astype(jnp.int32)


@functools.partial(nnx.jit, static_argnums=(3,))
def _generate(model, key, prompt_BxP, max_new_tokens, temperature, top_p):
  batch, length = prompt_BxP.shape
  cache = init_cache(model, batch, length + max_new_tokens)
  cache, hidden_BxPxD = prefill(model, prompt_BxP, cache)
  last_logits = model.logits(hidden_BxPxD[:, -1:])[:, 0]
  first_B = sample_logits(jax.random.fold_in(key, 0), last_logits, temperature, top_p)

  def body(carry, i):
    cache, token_B = carry
    cache, hidden_BxD = decode_step(model, cache, token_B, length + i)
    logits_BxV = model.logits(hidden_BxD[:, None])[:, 0]
    next_B = sample_logits(jax.random.fold_in(key, i + 1), logits_BxV, temperature, top_p)
    return (cache, next_B), next_B

  _, rest_NxB = jax.lax.scan(body, (cache, first_B), jnp.arange(max_new_tokens - 1))
  new_BxN = jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)
  return jnp.concatenate([prompt_BxP, new_BxN], axis=1)


def generate(model: Transformer, key, prompt_BxP, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0):
  """Continues each prompt row by max_new_tokens tokens; returns [B, P + max_new_tokens].

  temperature 0 is greedy decoding. The prompt must fit the model: P + max_new_tokens <=
  cfg.max_seq_len (refused before anything is compiled otherwise). Compiles once per
  (P, max_new_tokens, batch) shape.
  """
  check_causal(model)
  prompt = _check_prompt(model, prompt_BxP, max_new_tokens)
  if temperature < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need temperature >= 0 and top_p in (0, 1]; got {temperature}, {top_p}.")
  return _generate(model, key, prompt, int(max_new_tokens), temperature, top_p)


@functools.partial(nnx.jit, static_argnums=(2,))
def _cached_logits(model, tokens_BxL, prompt_len):
  batch, length = tokens_BxL.shape
  cache = init_cache(model, batch, length)
  cache, hidden_BxPxD = prefill(model, tokens_BxL[:, :prompt_len], cache)

  def body(cache, pos):
    cache, hidden_BxD = decode_step(model, cache, tokens_BxL[:, pos], pos)
    return cache, model.logits(hidden_BxD[:, None])[:, 0]

  _, logits_TxBxV = jax.lax.scan(body, cache, jnp.arange(prompt_len, length))
  return jnp.concatenate([model.logits(hidden_BxPxD), logits_TxBxV.transpose(1, 0, 2)], axis=1)


def cached_logits(model: Transformer, tokens_BxL, *, prompt_len: int = 1):
  """Teacher-forced logits [B, L, V] computed by prefilling `prompt_len` tokens and then feeding
  one token per decode step: the same numbers as model(tokens_BxL), by another route (tests)."""
  check_causal(model)
  tokens = jnp.asarray(tokens_BxL)
  if tokens.ndim != 2 or not 1 <= prompt_len <= tokens.shape[1] <= model.cfg.max_seq_len:
    raise ValueError(f"need tokens [batch, length] with 1 <= prompt_len={prompt_len} <= length <= "
                     f"max_seq_len={model.cfg.max_seq_len}; got shape {tokens.shape}.")
  return _cached_logits(model, tokens.astype(jnp.int32), int(prompt_len))
