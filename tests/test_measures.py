"""Evaluation measures against brute-force computations on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm import measures, objectives, schedules
from mdlm.models import build, presets

V, L, B = 29, 12, 3


@pytest.fixture(scope="module")
def model():
  return build(presets.get("tiny", vocab_size=V, max_seq_len=L), seed=3)


def _batch():
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  token_mask = jnp.arange(L)[None, :] < jnp.asarray([[L], [7], [1]])
  return {"tokens": tokens, "token_mask": token_mask}


def _setup(pad_layout=True):
  return objectives.Setup(schedule=schedules.get("loglinear"), mask_id=V, pad_layout=pad_layout)


def _log_softmax_np(z):
  z = np.asarray(z, np.float64)
  return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1,
                                                                                      keepdims=True))


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_pll_equals_a_loop_over_positions(model, chunk):
  batch = _batch()
  terms = jax.jit(lambda b: measures.pll_terms(model, b, None, _setup(), chunk=chunk))(batch)
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["token_mask"])
  expected = np.zeros(B)
  for b in range(B):
    for i in range(L):
      if not mask[b, i]:
        continue
      x = tokens[b:b + 1].copy()
      x[0, i] = V
      logits = np.asarray(model(jnp.asarray(x), token_mask_BxL=jnp.asarray(mask[b:b + 1])))
      expected[b] -= _log_softmax_np(logits[0, i, :V])[tokens[b, i]]
  np.testing.assert_allclose(np.asarray(terms.nll_sum_B), expected, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(terms.num_tokens_B), mask.sum(1))


def test_masked_measure_masks_round_r_n_and_scores_them(model):
  batch = _batch()
  key = jax.random.key(2)
  terms = measures.masked_terms(model, batch, key, _setup(), ratio=0.4)
  np.testing.assert_array_equal(np.asarray(terms.num_tokens_B), [5, 3, 0])  # round(0.4 n)
  assert float(terms.nll_sum_B[2]) == 0.0


def test_ar_measure_is_the_causal_next_token_nll(model):
  batch = _batch()
  terms = measures.ar_terms(model, batch, None, _setup())
  logits = np.asarray(model(batch["tokens"], token_mask_BxL=batch["token_mask"], causal=True))
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["token_mask"])
  logp = _log_softmax_np(logits[:, :-1])
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]
  np.testing.assert_allclose(np.asarray(terms.nll_sum_B), nll.sum(1), rtol=1e-5)


def test_measure_groups_expand():
  assert measures.expand(["nelbo", "masked", "masked40"]) == ["nelbo", "masked15", "masked40",
                                                            "masked80"]
  with pytest.raises(ValueError, match="Unknown measure"):
    measures.expand(["perplexity"])
