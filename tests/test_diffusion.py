"""The forward process and the NELBO, checked against identities and independent computations."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm import diffusion, schedules

SCHEDULES = [("loglinear", {}), ("cosine", {}), ("cosine_squared", {}), ("linear", {}),
             ("geometric", {}), ("polynomial", {"k": 2.0})]

# A small known joint distribution over sequences of length 4 on 3 tokens; the mask id is 3.
L, V, MASK = 4, 3, 3
SEQS = np.array(list(itertools.product(range(V), repeat=L)))          # [81, 4]
JOINT = np.random.default_rng(0).dirichlet(np.full(len(SEQS), 0.3))  # correlated, peaky


def exact_conditional_logits(xt_BxL):
  """log p(x0_i = v | xt) for every position: the exact per-position marginals of the joint."""
  xt = np.asarray(xt_BxL)
  consistent = np.all((xt[:, None, :] == MASK) | (xt[:, None, :] == SEQS[None]), axis=-1)
  post = consistent * JOINT[None]                                    # [B, 81]
  post = post / post.sum(-1, keepdims=True)
  onehot = np.eye(V)[SEQS]                                           # [81, L, V]
  marg = np.einsum("bs,slv->blv", post, onehot)
  return jnp.asarray(np.log(np.maximum(marg, 1e-30)), jnp.float32)


def mc_nelbo(x0, schedule, key, n, num_steps=None):
  x0_BxL = jnp.tile(jnp.asarray(x0)[None], (n, 1))
  per_token, _, _ = diffusion.diffusion_loss(
      key, lambda xt, t: exact_conditional_logits(xt), x0_BxL, schedule, MASK, num_steps=num_steps)
  per_seq = np.asarray(per_token.sum(-1), np.float64)
  return per_seq.mean(), per_seq.std() / math.sqrt(n)


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_exact_denoiser_nelbo_equals_true_nll(name, params):
  """With exact conditionals the continuous NELBO is the any-order AR NLL = -log p(x), for every
  schedule (MD4 section 3; u-PMLM): this catches almost any wrong weight."""
  schedule = schedules.get(name, **params)
  for j, idx in enumerate([int(np.argmax(JOINT)), 17, 60]):
    x0 = SEQS[idx]
    est, se = mc_nelbo(x0, schedule, jax.random.key(j), 20000)
    true_nll = -math.log(JOINT[idx])
    assert abs(est - true_nll) < 4 * se + 0.01 * true_nll, (name, idx, est, true_nll, se)


def test_discrete_time_nelbo_is_looser_and_converges():
  schedule = schedules.get("loglinear")
  idx = 17
  true_nll = -math.log(JOINT[idx])
  coarse, se_c = mc_nelbo(SEQS[idx], schedule, jax.random.key(1), 20000, num_steps=2)
  fine, se_f = mc_nelbo(SEQS[idx], schedule, jax.random.key(2), 20000, num_steps=1000)
  assert coarse > true_nll + 4 * se_c          # unmasking several tokens at once costs nats
  assert abs(fine - true_nll) < 4 * se_f + 0.01 * true_nll


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_uniform_model_identity(name, params):
  """Uniform predictions over V tokens: NELBO per token = log V (alpha(t_min) - alpha(1))."""
  schedule = schedules.get(name, **params)
  vocab, batch, length = 50, 2048, 256
  x0 = jax.random.randint(jax.random.key(0), (batch, length), 0, vocab)
  per_token, _, _ = diffusion.diffusion_loss(
      jax.random.key(1), lambda xt, t: jnp.zeros((batch, length, vocab + 1)), x0, schedule, vocab)
  est = float(per_token.sum()) / (batch * length)
  expected = math.log(vocab) * float(schedule.alpha(diffusion.T_MIN) - schedule.alpha(1.0))
  assert est == pytest.approx(expected, rel=0.02)


def test_nelbo_matches_independent_numpy():
  rng = np.random.default_rng(3)
  b, l, v, mask_id = 5, 7, 11, 11
  logits = rng.normal(size=(b, l, v + 1)).astype(np.float32) * 3
  x0 = rng.integers(0, v, (b, l))
  xt = np.where(rng.random((b, l)) < 0.5, mask_id, x0)
  token_mask = rng.random((b, l)) < 0.8
  t = rng.uniform(0.01, 1.0, b).astype(np.float32)
  out = diffusion.nelbo(logits, x0, xt, t, schedules.get("loglinear"), mask_id, token_mask)

  ref = np.zeros((b, l))
  for i in range(b):
    for j in range(l):
      if xt[i, j] == mask_id and token_mask[i, j]:
        z = logits[i, j, :v].astype(np.float64)   # the mask logit is ignored
        logp = z - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
        ref[i, j] = (1 - 1e-3) / t[i] * -logp[x0[i, j]]
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)

  # Discrete time: T (alpha_s - alpha_t) / (1 - alpha_t) with s = t - 1/T.
  T = 10
  t_grid = np.ceil(t * T) / T
  out_d = diffusion.nelbo(logits, x0, xt, t_grid, schedules.get("loglinear"), mask_id, token_mask,
                          num_steps=T)
  a = lambda u: 1 - (1 - 1e-3) * u
  w = T * (a(t_grid - 1 / T) - a(t_grid)) / (1 - a(t_grid))
  np.testing.assert_allclose(np.asarray(out_d), ref * t[:, None] / (1 - 1e-3) * w[:, None],
                             rtol=1e-5, atol=1e-6)


def test_subs_carry_over_and_no_mask_prediction():
  b, l, v, mask_id = 2, 6, 9, 9
  logits = jax.random.normal(jax.random.key(0), (b, l, v + 1)) * 5
  x0 = jax.random.randint(jax.random.key(1), (b, l), 0, v)
  xt = x0.at[:, ::2].set(mask_id)
  # Non-finite logits at unmasked positions must not leak into the loss.
  logits = logits.at[:, 1::2].set(jnp.nan)
  out = diffusion.nelbo(logits, x0, xt, jnp.full((b,), 0.5), schedules.get("cosine"), mask_id)
  assert np.all(np.asarray(out[:, 1::2]) == 0.0)
  assert np.all(np.asarray(out[:, ::2]) > 0.0)
  logp = diffusion.subs_log_probs(logits.at[:, 1::2].set(0.0), xt, mask_id)
  probs = np.exp(np.asarray(logp))
  assert np.all(probs[..., mask_id] == 0.0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(probs[:, 1::2].argmax(-1), np.asarray(xt[:, 1::2]))
  assert np.all(probs[:, 1::2].max(-1) == 1.0)


def test_corrupt_respects_padding_and_rate():
  x0 = jnp.zeros((4000, 64), jnp.int32)
  token_mask = jnp.arange(64)[None, :] < 48
  t = jnp.full((4000,), 0.3)
  s = schedules.get("loglinear")
  xt = diffusion.corrupt(jax.random.key(0), x0, t, s, 99, jnp.broadcast_to(token_mask, x0.shape))
  masked = np.asarray(xt == 99)
  assert not masked[:, 48:].any()
  assert masked[:, :48].mean() == pytest.approx(float(s.mask_prob(0.3)), abs=0.005)


def test_sample_times_is_stratified_over_global_batch():
  t = np.sort(np.asarray(diffusion.sample_times(jax.random.key(0), 64)))
  assert t.min() >= 1e-3 and t.max() < 1.0
  np.testing.assert_allclose(np.diff(t), (1 - 1e-3) / 64, rtol=1e-4)
  t_iid = np.asarray(diffusion.sample_times(jax.random.key(0), 64, antithetic=False))
  assert t_iid.min() >= 1e-3 and t_iid.max() < 1.0


def test_summary_units():
  s = diffusion.summarize(2.0 * 100, 100)
  assert s["nll"] == 2.0 and s["ppl"] == pytest.approx(math.exp(2.0))
  assert s["bpt"] == pytest.approx(2.0 / math.log(2))
  terms = diffusion.loss_terms(jnp.asarray([[1.0, 0.0, 2.0]]), jnp.asarray([[True, True, False]]))
  assert float(terms.nll_sum_B[0]) == 3.0 and float(terms.num_tokens_B[0]) == 2.0


def test_ar_nll_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  x = rng.integers(0, 7, (2, 5))
  out = np.asarray(diffusion.ar_nll(logits, x))
  z = logits[:, :-1].astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ref = -np.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_bad_input_is_refused_before_compile():
  s = schedules.get("loglinear")
  x0 = jnp.zeros((2, 4), jnp.int32)
  logits = jnp.zeros((2, 4, 5))
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    diffusion.nelbo(logits, x0, x0, jnp.asarray([0.0, 0.5]), s, 5)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    diffusion.corrupt(jax.random.key(0), x0, jnp.asarray([0.5, 1.5]), s, 5)
  with pytest.raises(ValueError, match="outside"):
    diffusion.nelbo(logits, x0.at[0, 0].set(7), x0, jnp.asarray([0.5, 0.5]), s, 5)
  with pytest.raises(ValueError, match="logits must be"):
    diffusion.nelbo(jnp.zeros((2, 3, 5)), x0, x0, jnp.asarray([0.5, 0.5]), s, 5)
  with pytest.raises(ValueError, match="t must have shape"):
    diffusion.nelbo(logits, x0, x0, jnp.asarray([0.5]), s, 5)
  with pytest.raises(ValueError, match="token_mask"):
    diffusion.corrupt(jax.random.key(0), x0, jnp.asarray([0.5, 0.5]), s, 5, jnp.ones((2, 3), bool))
