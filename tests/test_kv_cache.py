"""mdlm.models.kv_cache: a window run against the cache is the model's forward pass regrouped."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm.models import build, kv_cache, presets

V, L = 29, 12


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, V + 1)  # the mask id V included


@pytest.mark.parametrize("kw", [{}, {"time_conditioning": True, "scan_layers": True}])
def test_full_window_equals_forward(kw):
  model = build(presets.get("tiny", vocab_size=V, max_seq_len=L, **kw), seed=1)
  tokens = _tokens(0, (2, L))
  noise = jnp.asarray([0.3, 0.8])
  cache = kv_cache.init_cache(model, 2, L)
  window = nnx.jit(lambda m, c, t, n: m.logits(kv_cache.forward_window(
      m, c, t, 0, jnp.ones((1, 1, L), bool), noise_level_B=n)[1]))
  forward = nnx.jit(lambda m, t, n: m(t, n))
  np.testing.assert_allclose(window(model, cache, tokens, noise), forward(model, tokens, noise),
                             atol=2e-5, rtol=1e-5)


def test_window_against_cache_equals_masked_forward():
  """Two windows: the second attends to the first's cached keys and to itself; the first attends
  to itself only. The same numbers as a forward pass of the whole sequence whose first half is
  blind to the second half, computed here by running the halves in one window with that mask."""
  model = build(presets.get("tiny", vocab_size=V, max_seq_len=L), seed=2)
  tokens = _tokens(3, (2, L))
  half = L // 2
  block_causal = (np.arange(L)[:, None] >= half) | (np.arange(L)[None, :] < half)
  window = jax.jit(functools.partial(kv_cache.forward_window, model),
                   static_argnames=("write",))
  whole = kv_cache.init_cache(model, 2, L)
  _, hidden_whole = window(whole, tokens, 0, block_causal[None])
  cache = kv_cache.init_cache(model, 2, L)
  cache, first = window(cache, tokens[:, :half], 0, (np.arange(L) < half)[None, None])
  cache, second = window(cache, tokens[:, half:], half, np.ones((1, 1, L), bool))
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), hidden_whole, atol=2e-5)
  # write=False leaves the cache as it was
  again, _ = window(cache, tokens[:, :2], 0, np.ones((1, 1, L), bool), write=False)
  assert all(np.array_equal(a, b) for a, b in zip(again.k, cache.k))


def test_cache_bounds_are_refused():
  model = build(presets.get("tiny", vocab_size=V, max_seq_len=L))
  with pytest.raises(ValueError, match="cache length"):
    kv_cache.init_cache(model, 1, L + 1)
  assert kv_cache.init_cache(model, 1, 4 * L, max_length=4 * L).length == 4 * L
