"""Samplers: exactness against an oracle denoiser, exact categorical draws, caching, infilling,
confidence remasking, semi-autoregressive windows, guidance, text front end, metrics, refusals."""

import dataclasses
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sstats

from mdlm import schedules
from mdlm import rundir
from mdlm.models import build, presets
from mdlm.sampling import (ModelDenoiser, ancestral, categorical, confidence, decode,
                           denoiser_from_model,
                           guided, infill, inverse_cdf, parse_template, prompt_tokens,
                           semi_autoregressive, time_grid, top_p_filter, unigram_entropy,
                           window_starts)
from mdlm.sampling import ancestral_sampler as ancestral_lib
from mdlm.sampling import confidence_sampler as confidence_lib
from mdlm.sampling import denoisers as denoisers_lib
from mdlm import categorical as categorical_lib
from mdlm.sampling import metrics as metrics_lib
from mdlm.sampling import schedule_inverse

LOGLINEAR = schedules.get("loglinear")
P_MIN = 1e-3  # significance level of every statistical test (fixed seeds: deterministic)

# ---- an oracle: a known joint over {0,1,2}^4 whose exact conditionals are the denoiser ----------

OL, OV = 4, 3          # length, vocabulary; the mask id is OV
STATES = np.array(list(itertools.product(range(OV), repeat=OL)), np.int32)  # [81, 4]


def _joint(seed=0):
  p = np.random.default_rng(seed).dirichlet(np.full(OV ** OL, 2.0))
  return 0.9 * p + 0.1 / OV ** OL  # every cell has >= 12 expected counts at N = 10k


def make_oracle(p):
  """denoise(xt, t) = log p(x_i = v | unmasked tokens of xt), by enumeration of all states."""
  logp_S = jnp.log(jnp.asarray(p, jnp.float32))
  states_SxL = jnp.asarray(STATES)
  onehot_SxLxV = jax.nn.one_hot(states_SxL, OV, dtype=bool)

  def denoise(xt_BxL, t_B):
    del t_B
    consistent_BxS = jnp.all((xt_BxL[:, None] == OV) | (xt_BxL[:, None] == states_SxL[None]), -1)
    w_BxS = jnp.where(consistent_BxS, logp_S[None], -jnp.inf)
    joint_BxSxLxV = jnp.where(onehot_SxLxV[None], w_BxS[:, :, None, None], -jnp.inf)
    return jax.nn.logsumexp(joint_BxSxLxV, axis=1)

  return denoise


def _cell_counts(tokens_NxL):
  index = (np.asarray(tokens_NxL) * OV ** np.arange(OL)[::-1]).sum(1)
  return np.bincount(index, minlength=OV ** OL)


@pytest.fixture(scope="module")
def oracle():
  p = _joint()
  return p, make_oracle(p)


def test_ancestral_reproduces_oracle_joint_cached_and_uncached(oracle):
  p, denoise = oracle
  n = 10_000
  xt = jnp.full((n, OL), OV, jnp.int32)
  out = {}
  for cache in (True, False):
    tokens, st = ancestral(jax.random.key(0), denoise, xt, steps=10 * OL, schedule=LOGLINEAR,
                           mask_id=OV, cache=cache)
    out[cache] = np.asarray(tokens)
    chi = sstats.chisquare(_cell_counts(tokens), p * n)
    assert chi.pvalue > P_MIN, (cache, chi)
  np.testing.assert_array_equal(out[True], out[False])
  # The same test has power: sampling every position independently from its marginal (one
  # parallel step) is rejected.
  one_step, _ = ancestral(jax.random.key(0), denoise, xt, steps=1, schedule=LOGLINEAR, mask_id=OV)
  assert sstats.chisquare(_cell_counts(one_step), p * n).pvalue < 1e-6


def test_one_parallel_step_gives_product_of_marginals(oracle):
  p, denoise = oracle
  n = 10_000
  marg_LxV = np.stack([[p[STATES[:, i] == v].sum() for v in range(OV)] for i in range(OL)])
  product = np.prod(marg_LxV[np.arange(OL), STATES], axis=1)
  tokens, _ = ancestral(jax.random.key(1), denoise, jnp.full((n, OL), OV, jnp.int32), steps=1,
                        schedule=LOGLINEAR, mask_id=OV)
  assert sstats.chisquare(_cell_counts(tokens), product * n).pvalue > P_MIN


def test_oracle_infill_matches_conditional(oracle):
  """Given x_0 = 2 and x_3 = 1, the filled pair follows p(x_1, x_2 | x_0, x_3)."""
  p, denoise = oracle
  n = 10_000
  xt = jnp.broadcast_to(jnp.array([2, OV, OV, 1], jnp.int32), (n, OL))
  tokens = np.asarray(ancestral(jax.random.key(2), denoise, xt, steps=40, schedule=LOGLINEAR,
                                mask_id=OV, grid="cosine")[0])
  assert np.all(tokens[:, 0] == 2) and np.all(tokens[:, 3] == 1)
  keep = (STATES[:, 0] == 2) & (STATES[:, 3] == 1)
  cond = p[keep] / p[keep].sum()
  counts = np.bincount(tokens[:, 1] * OV + tokens[:, 2], minlength=OV * OV)
  expected = np.zeros(OV * OV)
  expected[STATES[keep, 1] * OV + STATES[keep, 2]] = cond * n
  assert sstats.chisquare(counts, expected).pvalue > P_MIN


def test_unmask_steps_follow_the_telescoped_schedule():
  steps, n = 8, 200_000
  t = time_grid(steps, "cosine")
  r = ancestral_lib.still_masked_prob(t, LOGLINEAR)
  k = np.asarray(ancestral_lib.unmask_steps(jax.random.key(3), jnp.ones((n, 1), bool),
                                            jnp.asarray(r)))[:, 0]
  assert k.min() >= 1 and k.max() <= steps + 1
  for step in range(1, steps + 1):  # P(still masked after step k) = r_k
    test = sstats.binomtest(int(np.sum(k > step)), n, float(r[step]))
    assert test.pvalue > P_MIN, (step, test)


def test_time_grids():
  for grid in ("uniform", "cosine"):
    t = time_grid(7, grid, t_end=1e-5)
    assert t[0] == 1.0 and abs(t[-1] - 1e-5) < 1e-9 and np.all(np.diff(t) < 0)
  np.testing.assert_allclose(np.diff(time_grid(4, "uniform", 1e-5)), -(1 - 1e-5) / 4, rtol=1e-5)
  with pytest.raises(ValueError, match="grid"):
    time_grid(4, "linear")


# ---- exact categorical sampling ---------------------------------------------------------------------


def _u_to_bits(u_int):
  u_int = np.asarray(u_int, np.uint64)
  hi, lo = u_int >> np.uint64(27), u_int & np.uint64((1 << 27) - 1)
  return np.stack([(hi << np.uint64(6)), (lo << np.uint64(5))]).astype(np.uint32)


def _tail_distribution(v):
  """A head, a zero, and tails of 1e-6, 1e-9, 1e-12, spread so each 128-block mixes sizes."""
  p = np.zeros(v)
  tiny = np.array([1e-6, 1e-9, 1e-12])
  p[3:] = tiny[np.arange(v - 3) % 3]
  p[0], p[1], p[2] = 0.6, 0.0, 0.0
  p[2] = 1.0 - p.sum()
  p[1] = 0.0
  return p


@pytest.mark.parametrize("v", [7, 300])  # one-level and two-level CDF
def test_inverse_cdf_interval_measure_is_exact_down_to_1e12(v):
  """The set of 53-bit uniforms mapped to token k has measure p_k (found by bisection)."""
  p = _tail_distribution(v)
  logits = np.log(np.where(p > 0, p, 1.0)).astype(np.float32)
  logits[p == 0] = -np.inf
  f = jax.jit(lambda b: inverse_cdf(jnp.broadcast_to(jnp.asarray(logits), (v, v)), b))
  # Boundary b_k = smallest u with token(u) >= k (the map is monotone in u).
  lo = np.zeros(v, np.int64)
  hi = np.full(v, 1 << 53, np.int64)
  target = np.arange(v)
  for _ in range(54):
    mid = (lo + hi) // 2
    tok = np.asarray(f(jnp.asarray(_u_to_bits(np.minimum(mid, (1 << 53) - 1)))))
    ge = tok >= target
    hi = np.where(ge, mid, hi)
    lo = np.where(ge, lo, mid + 1)
  bounds = np.append(hi, 1 << 53).astype(np.float64)
  measure = np.diff(bounds) * 2.0 ** -53
  np.testing.assert_allclose(measure, p, rtol=1e-5, atol=1e-15)
  assert measure[1] == 0.0  # a zero-probability token is never drawn


def test_categorical_unbiased_on_1e6_tail():
  """Head 0.6 / 0.4 - tail, 64 tail tokens of probability 1e-6 each: binomial test on the tail."""
  v_tail, p_tail = 64, 1e-6
  p = np.concatenate([[0.6, 0.4 - v_tail * p_tail], np.full(v_tail, p_tail)])
  logits = jnp.asarray(np.log(p), jnp.float32)
  chunk, chunks = 1 << 20, 4
  draw = jax.jit(lambda key, lg: categorical(key, jnp.broadcast_to(lg, (chunk, lg.shape[0]))))
  counts = np.zeros(len(p), np.int64)
  for i in range(chunks):
    counts += np.bincount(np.asarray(draw(jax.random.key(i), logits)), minlength=len(p))
  n = chunk * chunks
  tail = int(counts[2:].sum())
  assert sstats.binomtest(tail, n, v_tail * p_tail).pvalue > P_MIN, (tail, n * v_tail * p_tail)
  assert sstats.binomtest(int(counts[0]), n, 0.6).pvalue > P_MIN
  assert sstats.chisquare(counts[2:]).pvalue > P_MIN  # tail tokens equally likely


@pytest.mark.slow
def test_float32_gumbel_fails_the_tail_test_that_exact_sampling_passes():
  """Power check of the tail test: jax.random.categorical (float32 Gumbel) under-draws 1e-7."""
  v_tail, p_tail = 64, 1e-7
  p = np.concatenate([[0.6, 0.4 - v_tail * p_tail], np.full(v_tail, p_tail)])
  logits = jnp.asarray(np.log(p), jnp.float32)
  chunk, chunks = 1 << 21, 8
  n = chunk * chunks
  exact = jax.jit(lambda k, lg: categorical(k, jnp.broadcast_to(lg, (chunk, lg.shape[0]))))
  gumbel = jax.jit(lambda k, lg: jax.random.categorical(k, lg, shape=(chunk,)))
  tails = {}
  for name, fn in (("exact", exact), ("gumbel", gumbel)):
    tails[name] = sum(int(np.sum(np.asarray(fn(jax.random.key(i), logits)) >= 2))
                      for i in range(chunks))
  assert sstats.binomtest(tails["exact"], n, v_tail * p_tail).pvalue > P_MIN
  assert sstats.binomtest(tails["gumbel"], n, v_tail * p_tail).pvalue < 1e-4, tails


@pytest.mark.parametrize("v", [5, 200, 256, 300, 1000])  # one level; ragged and full blocks
def test_max_and_argmax_matches_numpy_first_index_ties_included(v):
  from mdlm import categorical
  rng = np.random.default_rng(v)
  # Few distinct values, so most rows have ties, some spanning blocks and the ragged tail.
  x = rng.integers(0, 6, size=(64, v)).astype(np.float32)
  x[0] = -np.inf
  x[0, v - 1] = 0.0                  # the only finite entry is the last (ragged block)
  x[1, [3, v - 1]] = 9.0             # tie between the first block and the last entry
  x[2, :] = 1.0                      # all equal: index 0
  top, index = jax.jit(categorical.max_and_argmax)(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(index), np.argmax(x, axis=-1))
  np.testing.assert_array_equal(np.asarray(top), np.max(x, axis=-1))
  np.testing.assert_array_equal(np.asarray(categorical.argmax(jnp.asarray(x.reshape(4, 16, v)))),
                                np.argmax(x, axis=-1).reshape(4, 16))


def test_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.8)))[0]
  assert kept.tolist() == [True, True, False, False]
  assert np.isfinite(np.asarray(top_p_filter(logits, 0.81)))[0].tolist() == [True, True, True,
                                                                             False]
  assert np.isfinite(np.asarray(top_p_filter(logits, 0.1)))[0].tolist() == [True, False, False,
                                                                            False]
  n = 1 << 16
  bits = categorical_lib.uniform_bits(jax.random.key(5), (n,))
  lp = jnp.broadcast_to(jax.nn.log_softmax(logits), (n, 4))
  draw = jax.jit(categorical_lib.draw, static_argnames=("temperature", "top_p"))
  hot = np.bincount(np.asarray(draw(lp, bits, temperature=0.5, top_p=1.0)), minlength=4)
  expect = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  assert sstats.chisquare(hot, expect / expect.sum() * n).pvalue > P_MIN
  nucleus = np.bincount(np.asarray(draw(lp, bits, temperature=1.0, top_p=0.8)), minlength=4)
  assert sstats.chisquare(nucleus[:2], np.array([5, 3]) / 8 * n).pvalue > P_MIN
  assert nucleus[2:].sum() == 0
  greedy = draw(lp, bits, temperature=0.0, top_p=1.0)
  assert np.all(np.asarray(greedy) == 0)


# ---- denoisers for the behavioural tests ----------------------------------------------------------

V, L = 41, 24


class Toy:
  """A cheap denoiser that depends on the whole input: logits_i = sum_j A_ij E[xt_j] (times
  1 + 3t when time_dependent)."""

  def __init__(self, vocab=V, length=L, seed=0, time_dependent=False):
    rng = np.random.default_rng(seed)
    self.time_conditioned = time_dependent
    self.a = jnp.asarray(rng.normal(size=(length, length)) * 0.5, jnp.float32)
    self.e = jnp.asarray(rng.normal(size=(vocab + 1, vocab)) * 2.0, jnp.float32)
    self.mask_id, self.max_length = vocab, length

  def __call__(self, xt_BxL, t_B):
    n = xt_BxL.shape[1]
    logits = jnp.einsum("ij,bjv->biv", self.a[:n, :n], self.e[xt_BxL])
    return logits * (1.0 + 3.0 * t_B[:, None, None]) if self.time_conditioned else logits


@pytest.fixture(scope="module")
def toy():
  return Toy()


@pytest.fixture(scope="module")
def model():
  return build(presets.get("tiny", vocab_size=V, max_seq_len=L, d_model=32, num_heads=2), seed=0)


def test_model_cached_equals_uncached_and_nfe_bound(model):
  denoise = denoiser_from_model(model)
  assert not denoise.time_conditioned and denoise.max_length == L
  xt = jnp.full((1, L), model.mask_id, jnp.int32)
  a, sa = ancestral(jax.random.key(7), denoise, xt, steps=10 * L, schedule=LOGLINEAR,
                    mask_id=model.mask_id, cache=True)
  b, sb = ancestral(jax.random.key(7), denoise, xt, steps=10 * L, schedule=LOGLINEAR,
                    mask_id=model.mask_id, cache=False)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(sa["nfe"]) <= L + 1 and int(sb["nfe"]) == 10 * L + 1
  assert np.all(np.asarray(a) < V)


class _NoiseEcho(nnx.Module):
  """A stand-in time-conditioned denoiser whose logits echo the noise level it receives."""

  def __init__(self):
    self.cfg = presets.get("tiny", vocab_size=V, max_seq_len=L, time_conditioning=True)
    self.scale = nnx.Param(jnp.ones((V,)))

  @property
  def mask_id(self):
    return V

  def __call__(self, tokens_BxL, noise_level_B=None):
    return noise_level_B[:, None, None] * self.scale[...] + 0.0 * tokens_BxL[..., None]


def test_time_conditioned_adapter_passes_the_noise_level():
  cosine = schedules.get("cosine")
  denoise = denoiser_from_model(_NoiseEcho(), cosine)
  assert denoise.time_conditioned and denoise.mask_id == V and denoise.max_length == L
  t = jnp.array([0.2, 0.7])
  out = jax.jit(lambda d, x, t: d(x, t))(denoise, jnp.zeros((2, 3), jnp.int32), t)
  np.testing.assert_allclose(np.asarray(out)[:, 0, 0], np.asarray(cosine.mask_prob(t)), rtol=1e-6)


SCHEDULES = [("loglinear", {}), ("cosine", {}), ("cosine_squared", {}), ("linear", {}),
             ("geometric", {}), ("polynomial", {"k": 0.5}), ("polynomial", {"k": 3.0})]


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_schedule_inverse_round_trips_alpha(name, params):
  """time_at_alpha(alpha(t)) gives back alpha to float32 rounding, and t where t is well
  conditioned; the generic bisection (any monotone schedule) agrees; outside the schedule's range
  the nearest end is returned; all under jit."""
  s = schedules.get(name, **params)
  t = jnp.linspace(0.0, 1.0, 1001)
  a = s.alpha(t)
  back = jax.jit(lambda a: schedule_inverse.time_at_alpha(s, a))(a)
  bisected = jax.jit(lambda a: schedule_inverse.bisect(s, 1.0 - a))(a)
  for got in (back, bisected):
    np.testing.assert_allclose(np.asarray(s.alpha(got)), np.asarray(a), rtol=0, atol=5e-7)
    np.testing.assert_allclose(np.asarray(got)[50:900], np.asarray(t)[50:900], atol=2e-5)
  ends = schedule_inverse.time_at_mask_prob(s, jnp.array([-0.5, 0.0, 1.0, 1.5]))
  np.testing.assert_allclose(np.asarray(ends), [0.0, 0.0, 1.0, 1.0], atol=1e-6)


class _Cubic(schedules.Schedule):
  """A schedule without a closed-form inverse here: alpha = (1 - t)^3 (1 - 0.1 t)."""

  def alpha(self, t):
    t = jnp.asarray(t, jnp.float32)
    return (1.0 - t) ** 3 * (1.0 - 0.1 * t)


def test_schedule_inverse_bisects_other_schedules():
  s = _Cubic()
  t = jnp.linspace(0.0, 0.95, 96)
  got = jax.jit(lambda a: schedule_inverse.time_at_alpha(s, a))(s.alpha(t))
  np.testing.assert_allclose(np.asarray(s.alpha(got)), np.asarray(s.alpha(t)), atol=3e-7)
  np.testing.assert_allclose(np.asarray(got), np.asarray(t), atol=2e-5)


_NOISE_SEEN = []  # (noise level the model received [B], masked fraction of its input [B])


@jax.tree_util.register_pytree_node_class
class _RecordNoise(ModelDenoiser):
  """A model denoiser that records the noise level its model receives next to the masked
  fraction of the input it receives (host callbacks from inside the compiled sampler)."""

  def _record(self, xt_BxL, t_B):
    jax.debug.callback(lambda n, f: _NOISE_SEEN.append((np.asarray(n), np.asarray(f))),
                       self._noise(t_B), jnp.mean(xt_BxL == self.mask_id, axis=1))

  def __call__(self, xt_BxL, t_B):
    self._record(xt_BxL, t_B)
    return super().__call__(xt_BxL, t_B)

  def features(self, xt_BxL, t_B):
    self._record(xt_BxL, t_B)
    return super().features(xt_BxL, t_B)


def test_confidence_gives_time_conditioned_models_the_true_masked_fraction():
  """A time-conditioned model trained with a cosine schedule read noise level mask_prob(t) over
  all real tokens. At every confidence step it must receive the fraction of its input's tokens
  that are masked (given tokens count): under guidance (the conditional half is the plain call;
  the unconditional half, with the prompt masked too, gets its own larger fraction) and in
  semi-AR windows (the window's fraction; the unguided path). Two compiles: a few seconds."""
  cosine = schedules.get("cosine")
  net = build(presets.get("tiny", vocab_size=V, max_seq_len=L, d_model=16, num_heads=2,
                          num_layers=1, time_conditioning=True), seed=0)
  d = denoiser_from_model(net, cosine)
  rec = _RecordNoise(d.graph, d.state, cosine, True, d.mask_id, d.vocab_size, d.max_length)
  xt = jnp.full((2, L), V, jnp.int32).at[0, :3].set(1).at[1, :9].set(2)  # prompts of 3 and 9
  prompt = np.asarray(xt != V)
  runs = {  # block_length = 8: one slab width, one compiled branch
      "guided": lambda: confidence(jax.random.key(0), guided(rec, prompt, 1.0), xt, steps=6,
                                   mask_id=V, block_length=8, temperature=0.5),
      "semi_ar": lambda: semi_autoregressive(jax.random.key(0), rec, xt[:, :16].at[:, 12:].set(V),
                                             window=8, stride=4, sampler="confidence", steps=4,
                                             mask_id=V),
  }
  for name, call in runs.items():
    _NOISE_SEEN.clear()
    jax.block_until_ready(call())
    jax.effects_barrier()
    assert len(_NOISE_SEEN) >= 4, name
    for noise_B, fraction_B in _NOISE_SEEN:
      assert np.any(fraction_B > 0), name
      # A fully masked input (the guided unconditional branch at the start) gets the schedule's
      # highest noise level, 1 - alpha(1) = 1 - eps.
      reachable_B = np.minimum(fraction_B, float(cosine.mask_prob(1.0)))
      np.testing.assert_allclose(noise_B, reachable_B, atol=2e-6, err_msg=name)
    if name == "guided":  # the unconditional half of the batch saw more masks
      assert all(np.all(f[2:] > f[:2]) for _, f in _NOISE_SEEN)


def test_cache_is_exact_for_time_dependent_denoisers_any_batch():
  """Skipping is exact even when the output depends on t: each call sees the uncached input and
  time. Batch 4, temperature and the cosine grid included. Filling a step's positions in slabs
  of one position gives the same tokens too."""
  toy = Toy(time_dependent=True)
  xt = jnp.full((4, L), toy.mask_id, jnp.int32).at[1, 3:9].set(2)
  kw = dict(steps=3 * L, schedule=schedules.get("cosine"), mask_id=toy.mask_id, temperature=0.8,
            top_p=1.0, grid="cosine")
  a, sa = ancestral(jax.random.key(17), toy, xt, cache=True, **kw)
  b, _ = ancestral(jax.random.key(17), toy, xt, cache=False, **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(sa["nfe"]) <= L + 1  # rows advance independently: the bound holds for any batch
  xt, t_grid, r_grid, spec = ancestral_lib.prepare(xt, toy, cache=True, t_end=1e-5, **kw)
  assert spec.budget > 1
  c, _ = ancestral_lib._ancestral_jit(toy, jax.random.key(17), xt, t_grid, r_grid,
                                      spec=dataclasses.replace(spec, budget=1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def _scattered_xt(mask_id, seed=0, batch=3):
  rng = np.random.default_rng(seed)
  given = rng.integers(0, V, (batch, L))
  hole = rng.random((batch, L)) < 0.5
  hole[0, :8] = True        # a prefix hole
  hole[1, -6:] = True       # a suffix to write
  hole[2, 5:15] = True      # a span
  return jnp.asarray(np.where(hole, mask_id, given), jnp.int32), given, hole


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_infilling_keeps_given_tokens_and_fills_every_mask(toy, sampler):
  xt, given, hole = _scattered_xt(toy.mask_id)
  if sampler == "ancestral":
    # Two steps leave masks to the final noise-removal pass too.
    tokens, _ = ancestral(jax.random.key(10), toy, xt, steps=2, schedule=LOGLINEAR,
                          mask_id=toy.mask_id, top_p=0.9)
  else:
    tokens, _ = confidence(jax.random.key(10), toy, xt, steps=5, mask_id=toy.mask_id,
                           block_length=4, temperature=0.7)
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(tokens[~hole], given[~hole])
  assert np.all(tokens < V)


# ---- confidence remasking -----------------------------------------------------------------------------


def _llada_counts(m, s):
  """LLaDA's linear schedule: floor(m/s) per step, the remainder to the first steps."""
  return [m // s + (i < m % s) for i in range(s)]


def test_confidence_commits_the_scheduled_most_confident(toy):
  xt, _, hole = _scattered_xt(toy.mask_id, seed=1)
  steps = 5
  tokens, st = confidence(jax.random.key(11), toy, xt, steps=steps, mask_id=toy.mask_id)
  commits, fill = np.asarray(st["commits"]), np.asarray(st["fill_step"])
  for b in range(xt.shape[0]):
    assert commits[:, b].tolist() == _llada_counts(int(hole[b].sum()), steps)
  assert int(st["nfe"]) == steps
  # Replay: at each step the committed positions are the argmax predictions with the highest
  # probabilities among the still-masked ones.
  x = np.array(xt)
  for i in range(1, steps + 1):
    logp = np.asarray(jax.nn.log_softmax(toy(jnp.asarray(x), None), axis=-1))
    for b in range(x.shape[0]):
      masked = np.flatnonzero(x[b] == toy.mask_id)
      chosen = np.flatnonzero(fill[b] == i)
      conf = logp[b, masked].max(-1)
      assert set(chosen) == set(masked[np.argsort(-conf, kind="stable")[:len(chosen)]])
      x[b, chosen] = logp[b, chosen].argmax(-1)
  np.testing.assert_array_equal(x, np.asarray(tokens))


def test_confidence_skips_steps_with_nothing_to_commit(toy):
  """More steps than masks: the schedule commits one token per step until the row is done, and
  the steps after that (no row has a mask left) call no denoiser."""
  xt, _, hole = _scattered_xt(toy.mask_id, seed=3)
  masked_B = hole.sum(1)
  steps = 3 * int(masked_B.max())
  tokens, st = confidence(jax.random.key(5), toy, xt, steps=steps, mask_id=toy.mask_id)
  commits = np.asarray(st["commits"])
  for b in range(xt.shape[0]):
    assert commits[:, b].tolist() == _llada_counts(int(masked_B[b]), steps)
  assert int(st["nfe"]) == int(masked_B.max())
  assert np.all(np.asarray(tokens) != toy.mask_id)


def test_confidence_blocks_fill_in_order(toy):
  xt = jnp.full((2, L), toy.mask_id, jnp.int32).at[:, :3].set(1)  # prompt of 3, 21 to fill
  block, steps = 6, 8                                             # 4 blocks (6, 6, 6, 3)
  tokens, st = confidence(jax.random.key(12), toy, xt, steps=steps, mask_id=toy.mask_id,
                          block_length=block, remasking="random")
  fill = np.asarray(st["fill_step"])[:, 3:]
  commits = np.asarray(st["commits"])
  for b in range(2):
    blocks = [fill[b, i:i + block] for i in range(0, 21, block)]
    for earlier, later in zip(blocks, blocks[1:]):
      assert earlier.max() < later.min()
    assert commits[:, b].tolist() == sum((_llada_counts(len(bl), 2) for bl in blocks), [])
  assert np.all(np.asarray(tokens)[:, :3] == 1) and np.all(fill > 0)


def test_confidence_threshold_rule(toy):
  xt = jnp.full((1, L), toy.mask_id, jnp.int32)
  # tau ~ 0 commits everything in the first step of each block: 2 blocks -> 2 denoiser calls.
  _, st = confidence(jax.random.key(13), toy, xt, steps=L, mask_id=toy.mask_id,
                     block_length=L // 2, threshold=1e-30)
  assert int(st["nfe"]) == 2
  assert np.asarray(st["commits"])[0, 0] == L // 2
  # tau = 0.9: each step commits every prediction with probability >= tau, and at least one
  # (Fast-dLLM); replayed against the denoiser step by step.
  tau = 0.9
  tokens, st = confidence(jax.random.key(13), toy, xt, steps=L, mask_id=toy.mask_id,
                          threshold=tau)
  commits, fill = np.asarray(st["commits"])[:, 0], np.asarray(st["fill_step"])[0]
  assert commits.sum() == L and int(st["nfe"]) == np.count_nonzero(commits)
  x = np.array(xt)
  for i in np.flatnonzero(commits) + 1:
    probs = np.asarray(jax.nn.softmax(toy(jnp.asarray(x), None), axis=-1))[0]
    masked = np.flatnonzero(x[0] == toy.mask_id)
    conf = probs[masked].max(-1)
    sure = set(masked[conf >= tau])
    chosen = set(np.flatnonzero(fill == i))
    assert chosen == (sure if sure else {masked[np.argmax(conf)]})
    x[0, list(chosen)] = probs[list(chosen)].argmax(-1)
  np.testing.assert_array_equal(x, np.asarray(tokens))


# ---- semi-autoregressive, guidance ------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["ancestral", "confidence"])
def test_semi_autoregressive_windows(toy, inner):
  length, window, stride = 61, L, 8
  xt = jnp.full((2, length), toy.mask_id, jnp.int32).at[:, :4].set(3)
  settings = (dict(steps=2 * window, schedule=LOGLINEAR) if inner == "ancestral"
              else dict(steps=window // 2, block_length=4))
  tokens, st = semi_autoregressive(jax.random.key(14), toy, xt, window=window, stride=stride,
                                   sampler=inner, mask_id=toy.mask_id, **settings)
  tokens, windows = np.asarray(tokens), np.asarray(st["windows"])
  starts = st["window_starts"]
  assert tokens.shape == (2, length) and np.all(tokens < V) and np.all(tokens[:, :4] == 3)
  assert starts == window_starts(length, window, stride) and starts[-1] == length - window
  for w in range(1, len(starts)):
    overlap = starts[w - 1] + window - starts[w]
    assert overlap >= window - stride
    np.testing.assert_array_equal(windows[w][:, :overlap], windows[w - 1][:, -overlap:])
  for w, s in enumerate(starts):
    np.testing.assert_array_equal(tokens[:, s:s + window], windows[w])


def test_guidance_w0_equals_conditional_and_formula(oracle, toy):
  _, odenoise = oracle
  # Same shapes and settings as the joint test, so the plain sampler is compiled once.
  xt = jnp.broadcast_to(jnp.array([1, OV, OV, OV], jnp.int32), (10_000, OL))
  prompt = jnp.array([True, False, False, False])
  a, _ = ancestral(jax.random.key(15), guided(odenoise, prompt, 0.0, mask_id=OV), xt, steps=40,
                   schedule=LOGLINEAR, mask_id=OV)
  b, _ = ancestral(jax.random.key(15), odenoise, xt, steps=40, schedule=LOGLINEAR, mask_id=OV)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jnp.full((2, L), toy.mask_id, jnp.int32).at[:, :5].set(jnp.arange(5))
  pm = jnp.arange(L) < 5
  t = jnp.array([0.5, 0.5])
  want = 2.5 * toy(x, t) - 1.5 * toy(jnp.where(pm, toy.mask_id, x), t)
  got = guided(toy, pm, 1.5)
  assert got.mask_id == toy.mask_id and got.max_length == L
  np.testing.assert_allclose(np.asarray(got(x, t)), np.asarray(want), rtol=1e-5, atol=1e-4)


# ---- two-stage denoisers: the output head at the filled positions only ---------------------------


def _positions(batch, count, seed=0):
  """Random positions per row, with some empty slots (index L, clamped by the gather)."""
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.permutation(L)[:count] for _ in range(batch)])
  idx[:, -1] = L
  return jnp.asarray(idx, jnp.int32)


def test_staged_denoisers_equal_the_full_forward(model, toy):
  cosine = schedules.get("cosine")
  conditioned = build(presets.get("tiny", vocab_size=V, max_seq_len=L, d_model=32, num_heads=2,
                                  time_conditioning=True), seed=1)
  x = jnp.asarray(np.random.default_rng(0).integers(0, V + 1, (2, L)), jnp.int32)
  t = jnp.array([0.3, 0.8])
  idx = _positions(2, 7)
  prompt = jnp.arange(L) < 4
  plain = denoiser_from_model(model)
  cases = {"model": plain, "time-conditioned": denoiser_from_model(conditioned, cosine),
           "guided model": guided(plain, prompt, 1.5), "guided plain": guided(toy, prompt, 1.5)}
  for name, denoise in cases.items():
    features_of, logits_at = denoisers_lib.stages(denoise)
    assert features_of is not denoise, name  # a real two-stage path, not the fallback
    got = logits_at(features_of(x, t), idx)
    want = jnp.take_along_axis(denoise(x, t), jnp.minimum(idx, L - 1)[..., None], axis=1)
    assert got.shape == (2, 7, V), name
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                               err_msg=name)
  # A plain callable: features are its logits, and logits_at gathers them exactly.
  features_of, logits_at = denoisers_lib.stages(toy)
  assert features_of is toy
  np.testing.assert_array_equal(np.asarray(logits_at(toy(x, t), idx)),
                                np.asarray(toy(x, t))[np.arange(2)[:, None],
                                                      np.minimum(idx, L - 1)])


@jax.tree_util.register_pytree_node_class
class _StagesOnly(ModelDenoiser):
  """A model denoiser whose full forward is unavailable: a sampler must use the two stages."""

  def __call__(self, xt_BxL, t_B):
    raise AssertionError("the sampler called the full forward instead of the two stages")


def test_samplers_give_the_same_tokens_with_or_without_the_staged_head(model):
  """The same model as a two-stage denoiser and as a plain callable (full logits, gathered).
  Exact equality holds here because no step meets a near-tie (the head at a few positions may
  round differently from the full head: see mdlm.sampling.denoisers)."""
  plain = denoiser_from_model(model)
  children, aux = plain.tree_flatten()
  staged = _StagesOnly.tree_unflatten(aux, children)
  full = lambda x, t: plain(x, t)
  xt, given, hole = _scattered_xt(model.mask_id, seed=4)
  for kw in (dict(temperature=0.0), dict(temperature=0.7, block_length=5),
             dict(threshold=0.5, block_length=8)):
    a, sa = confidence(jax.random.key(3), staged, xt, steps=9, mask_id=model.mask_id, **kw)
    b, sb = confidence(jax.random.key(3), full, xt, steps=9, mask_id=model.mask_id, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kw))
    np.testing.assert_array_equal(np.asarray(sa["fill_step"]), np.asarray(sb["fill_step"]))
  a, _ = ancestral(jax.random.key(3), staged, xt, steps=30, schedule=LOGLINEAR,
                   mask_id=model.mask_id)
  b, _ = ancestral(jax.random.key(3), full, xt, steps=30, schedule=LOGLINEAR,
                   mask_id=model.mask_id)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a)[~hole], given[~hole])


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(remasking="random"),
                                dict(threshold=0.3, block_length=10)])
def test_confidence_slab_width_does_not_change_the_result(toy, kw):
  """Each step predicts the candidates in the narrowest slab that holds them; one full-block
  slab at every step gives the same tokens, fill steps and commit counts."""
  xt = jnp.full((3, L), toy.mask_id, jnp.int32).at[1, 2:9].set(4)
  settings = dict(steps=L, mask_id=toy.mask_id, block_length=None, threshold=None,
                  temperature=0.0, remasking="low_confidence")
  xt, spec = confidence_lib.prepare(xt, toy, **{**settings, **kw})
  assert len(spec.slab_sizes) > 1 and spec.slab_sizes[0] == spec.block_length
  narrow = confidence_lib._confidence_jit(toy, jax.random.key(8), xt, spec=spec)
  wide = confidence_lib._confidence_jit(
      toy, jax.random.key(8), xt, spec=dataclasses.replace(spec, slab_sizes=spec.slab_sizes[:1]))
  for name in ("fill_step", "commits"):
    np.testing.assert_array_equal(np.asarray(narrow[1][name]), np.asarray(wide[1][name]))
  used = set(np.asarray(narrow[1]["slab_width"]).tolist()) - {0}
  assert len(used) > 1 and used <= set(spec.slab_sizes)  # the narrow widths were really used
  assert set(np.asarray(wide[1]["slab_width"]).tolist()) - {0} == {spec.block_length}
  if spec.block_length == L:  # one block: a step's candidates are the row's masked positions
    commits_SxB = np.asarray(narrow[1]["commits"])
    masked_SxB = np.asarray(xt == toy.mask_id).sum(1)[None] - (np.cumsum(commits_SxB, 0)
                                                               - commits_SxB)
    for width, need in zip(np.asarray(narrow[1]["slab_width"]), masked_SxB.max(1)):
      if width:  # the narrowest width that holds the fullest row
        assert width == min(w for w in spec.slab_sizes if w >= need), (width, need)
  np.testing.assert_array_equal(np.asarray(narrow[0]), np.asarray(wide[0]))


# ---- text front end -----------------------------------------------------------------------------------


class _Bytes:
  """A stand-in tokenizer: UTF-8 bytes, BOS/EOS/PAD = 256/257/258."""

  vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode(errors="replace")


def test_parse_template_and_prompt():
  tok = _Bytes()
  t = parse_template("The [MASK*5] of Denmark", tok, mask_id=259)
  assert t.tokens.tolist() == [256] + list(b"The ") + [259] * 5 + list(b" of Denmark")
  assert t.spans == [(5, 10)] and t.fill_mask.sum() == 5
  t = parse_template("[MASK]a[MASK*2]", tok, mask_id=259, add_bos=False, length=6)
  assert t.tokens.tolist() == [259, 97, 259, 259, 259, 259] and t.spans == [(0, 1), (2, 4), (4, 6)]
  assert prompt_tokens(tok, "ab", 5, 259).tolist() == [256, 97, 98, 259, 259]
  assert decode(tok, [256, 104, 105, 257, 256, 111, 259]) == "hi\no"


def test_infill_text_front_end():
  tok = _Bytes()
  denoise = Toy(vocab=tok.vocab_size, length=32, seed=2)
  out, st = infill(jax.random.key(16), denoise, tok, "The [MASK*5] of Denmark",
                   mask_id=denoise.mask_id, num_samples=2, steps=20, schedule=LOGLINEAR)
  assert len(out) == 2
  for sample in out:
    row = sample["tokens"]
    assert row[:5] == [256] + list(b"The ") and row[10:] == list(b" of Denmark")
    assert all(t < tok.vocab_size for t in row)
    assert len(sample["fills"]) == 1 and sample["fills"][0] == tok.decode(row[5:10])
  assert int(st["nfe"]) >= 1


def test_bad_settings_are_refused(toy, model):
  xt = jnp.full((1, L), toy.mask_id, jnp.int32)
  kw = dict(schedule=LOGLINEAR, mask_id=toy.mask_id)
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    ancestral(jax.random.key(0), toy, xt, steps=0, **kw)
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    confidence(jax.random.key(0), toy, xt, steps=0, mask_id=toy.mask_id)
  with pytest.raises(ValueError, match="no mask marker"):
    parse_template("The King of Denmark", _Bytes(), mask_id=259)
  with pytest.raises(ValueError, match="exceeds the model's maximum sequence length"):
    ancestral(jax.random.key(0), denoiser_from_model(model), jnp.full((1, L + 1), model.mask_id),
              steps=4, **kw)
  with pytest.raises(ValueError, match="longer than length"):
    prompt_tokens(_Bytes(), "a long prompt", 4, 259)
  with pytest.raises(ValueError, match="longer than length"):
    parse_template("a long [MASK] template", _Bytes(), mask_id=259, length=4)
  with pytest.raises(ValueError, match="mask_id"):
    ancestral(jax.random.key(0), toy, xt, steps=4, schedule=LOGLINEAR, mask_id=3)
  with pytest.raises(ValueError, match="stride"):
    semi_autoregressive(jax.random.key(0), toy, xt, window=8, stride=9, **kw, steps=4)
  with pytest.raises(ValueError, match="window"):
    semi_autoregressive(jax.random.key(0), toy, xt, window=L + 1, stride=4, steps=4, **kw)
  with pytest.raises(ValueError, match="top_p"):
    ancestral(jax.random.key(0), toy, xt, steps=4, top_p=0.0, **kw)
  with pytest.raises(ValueError, match="temperature"):
    ancestral(jax.random.key(0), toy, xt, steps=4, temperature=-1.0, **kw)
  with pytest.raises(ValueError, match="threshold"):
    confidence(jax.random.key(0), toy, xt, steps=4, mask_id=toy.mask_id, threshold=1.5)
  with pytest.raises(ValueError, match="blocks"):
    confidence(jax.random.key(0), toy, xt, steps=2, mask_id=toy.mask_id, block_length=4)
  with pytest.raises(ValueError, match="ids outside"):
    ancestral(jax.random.key(0), toy, xt.at[0, 0].set(V + 5), steps=4, **kw)
  with pytest.raises(ValueError, match="shape"):
    ancestral(jax.random.key(0), toy, xt[0], steps=4, **kw)
  # Shape-only models (nnx.eval_shape) suffice: the adapter refuses before touching weights.
  ar = nnx.eval_shape(lambda: build(presets.get("tiny", kind="ar", vocab_size=V, max_seq_len=L)))
  with pytest.raises(ValueError, match="denoiser"):
    denoiser_from_model(ar)
  tc = nnx.eval_shape(lambda: build(presets.get("tiny", vocab_size=V, max_seq_len=L,
                                                time_conditioning=True)))
  with pytest.raises(ValueError, match="schedule"):
    denoiser_from_model(tc)


# ---- metrics ------------------------------------------------------------------------------------------


def test_unigram_entropy():
  tokens = np.array([[0, 1, 2, 3], [5, 5, 5, 5], [1, 1, 2, 9]])
  out = unigram_entropy(tokens, ignore=[9])
  expected = [math.log(4), 0.0, -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))]
  np.testing.assert_allclose(out["per_sample"], expected, rtol=1e-12)
  np.testing.assert_allclose(out["mean"], np.mean(expected), rtol=1e-12)


def test_generative_perplexity_matches_direct_computation():
  ar = build(presets.get("tiny", kind="ar", vocab_size=V, max_seq_len=8, d_model=32,
                         num_heads=2), seed=3)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, V, n).tolist() for n in (8, 5, 13)]  # 13 > 8: scored in two chunks
  got = metrics_lib.generative_perplexity(ar, seqs, pad_id=0, batch_size=2)
  total, count = 0.0, 0
  for s in seqs:
    for start in range(0, len(s), 8):
      piece = np.asarray(s[start:start + 8])
      if len(piece) < 2:
        continue
      # Causal: appending filler after the piece changes none of its predictions.
      padded = np.concatenate([piece, np.zeros(8 - len(piece), int)])
      logp = jax.nn.log_softmax(ar(jnp.asarray(padded)[None])[0], axis=-1)
      total -= float(np.sum(np.asarray(logp)[np.arange(len(piece) - 1), piece[1:]]))
      count += len(piece) - 1
  assert got["num_tokens"] == count
  np.testing.assert_allclose(got["nll"], total / count, rtol=1e-5)
  np.testing.assert_allclose(got["gen_ppl"], math.exp(total / count), rtol=1e-5)


# ---- the CLI (slow: it trains tiny runs) and the notebooks (small setting) -------------------------


@pytest.mark.slow
def test_sample_cli_end_to_end(tmp_path):
  from mdlm import train
  from tests.helpers import run_python, tiny_config
  run_dir, ar_dir = str(tmp_path / "den"), str(tmp_path / "ar")
  train.run(tiny_config(steps=4), run_dir)
  ar_cfg = tiny_config(steps=4)
  ar_cfg.model = ar_cfg.model.replace(kind="ar")
  train.run(ar_cfg, ar_dir)
  out = str(tmp_path / "s.jsonl")
  proc = run_python(["-m", "mdlm.sample", f"run={run_dir}", "num_samples=3", "batch_size=2",
                     "sampler.steps=16", f"output={out}", f"evaluator={ar_dir}",
                     'template="To be, [MASK*6] to be"'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in open(out)]
  assert len(rows) == 3 and all(r["text"].startswith("To be, ") for r in rows)
  assert all(len(r["tokens"]) == 1 + 7 + 6 + 6 for r in rows)  # BOS, "To be, ", fill, " to be"
  summary = json.load(open(out + ".summary.json"))
  assert summary["gen_ppl"] > 1 and summary["unigram_entropy"] > 0
  assert "=== sample 2 ===" in proc.stdout
  for i, args in enumerate((["sampler=confidence", "sampler.steps=8", 'prompt="KING"'],
                            ["sampler=semi_ar", "length=80", "sampler.steps=8"])):
    out = str(tmp_path / f"s{i}.jsonl")  # an existing output is refused, never overwritten
    proc = run_python(["-m", "mdlm.sample", f"run={run_dir}", "num_samples=2", f"output={out}"]
                      + args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 2 and all(len(r["tokens"]) == (80 if "length=80" in args else 32)
                                  for r in rows)
  bad = run_python(["-m", "mdlm.sample", f"run={run_dir}", 'template="no marker"'])
  assert bad.returncode != 0 and "no mask marker" in bad.stderr
  bad = run_python(["-m", "mdlm.sample", f"run={run_dir}", "length=500"])
  assert bad.returncode != 0 and "maximum sequence length" in bad.stderr


def test_sharded_sampling_equals_one_device(tiny_run, tmp_path):
  """`python -m mdlm.sample` on a (data 2, fsdp 2) mesh of 4 simulated CPU devices: parameters
  sharded by the training rules, batch split over data x fsdp. The sharded denoiser's logits
  equal the unsharded ones to float rounding (FSDP reduces in another order), so the samples
  agree with the unsharded sampler's for the same key except where a rounding flips a draw and
  its block follows another path. A batch size the mesh cannot split is refused before
  loading."""
  import textwrap
  from tests.helpers import run_python
  script = textwrap.dedent("""
      import dataclasses, sys, jax, numpy as np
      from mdlm import rundir, sample, sharding
      from mdlm.config import MeshConfig
      from mdlm.sampling import config as config_lib, denoiser_from_model, run_sampler
      from mdlm.sampling import shard_denoiser
      run_dir, out = sys.argv[1], sys.argv[2]
      sampler = config_lib.SamplerConfig(name="confidence", steps=8, block_length=8,
                                         temperature=0.7)
      cfg = config_lib.SampleConfig(run=run_dir, sampler=sampler, num_samples=4, batch_size=4,
                                    length=24, output=out, print_samples=False, progress=False,
                                    mesh=MeshConfig(data=2, fsdp=2, tensor=1))
      tokens = np.array([it["tokens"] for it in sample.run(cfg)["samples"]])
      loaded = rundir.load_run(run_dir)
      plain = denoiser_from_model(loaded.model, loaded.config.noise.build())
      mask_id = loaded.model.mask_id
      xt_L, _ = sample._starting_sequence(cfg, loaded.tokenizer, mask_id, 24)
      xt = np.broadcast_to(np.asarray(xt_L, np.int32), (4, 24))
      want, _ = run_sampler(jax.random.fold_in(jax.random.key(0), 0), plain, xt,
                            sampler="confidence", **sampler.settings(None, mask_id))
      assert jax.device_count() == 4
      assert tokens.shape == (4, 24) and np.all(tokens[xt != mask_id] == xt[xt != mask_id])
      assert np.all(tokens < mask_id) and np.mean(tokens == np.asarray(want)) >= 0.9
      mesh = sharding.make_mesh(2, 2, 1)
      placed = shard_denoiser(plain, mesh, cfg.mesh.rules)
      assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed.state))
      x = jax.device_put(np.asarray(want), sharding.batch_sharding(mesh))
      t = np.full((4,), 0.5, np.float32)
      idx = np.tile(np.arange(0, 24, 3, dtype=np.int32), (4, 1))
      for got, ref in ((placed(x, t), plain(want, t)),
                       (placed.logits_at(placed.features(x, t), idx),
                        plain.logits_at(plain.features(want, t), idx))):
        assert not got.sharding.is_fully_replicated  # the batch stays split
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
      try:
        sample.run(dataclasses.replace(cfg, batch_size=3))
        raise AssertionError("batch_size=3 on 4 batch shards was not refused")
      except ValueError as e:
        assert "batch_size=3 is not a multiple of the 4 batch shards" in str(e), e
        assert "set batch_size=4" in str(e), e
      print("ok")
  """)
  proc = run_python(["-c", script, tiny_run, str(tmp_path / "samples.jsonl")],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "ok"


@pytest.fixture(scope="module")
def notebook_runs(tmp_path_factory):
  """One run root for both notebooks: the second reuses the runs the first trained."""
  return tmp_path_factory.mktemp("notebook_runs")


# One xdist group: both notebooks run on one worker, so the second reuses the runs the first
# trained (apart, each worker would train them).
@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("name", ["sampling", "infilling"])
def test_notebooks_execute(notebook_runs, name):
  """Runs a notebook top to bottom in the small setting (20 training steps, fewer samples and
  sweep points; notebooks/nb_utils.py). The committed outputs come from the full setting."""
  import nbformat
  from nbclient import NotebookClient
  from tests.helpers import REPO
  path = os.path.join(REPO, "notebooks", f"{name}.ipynb")
  nb = nbformat.read(path, as_version=4)
  env = {"MDLM_NB_STEPS": "20", "MDLM_NB_SMALL": "1", "MDLM_NB_RUN_ROOT": str(notebook_runs),
         "JAX_PLATFORMS": "cpu"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
