"""Block diffusion (BD3-LM, mdlm.objectives.block and mdlm.sampling.block) against exact answers.

The oracle is a model whose predictions are the true conditionals of a small known joint over
V^n sequences: at each query it conditions on exactly the unmasked tokens its attention mask lets
it see (at their rotary positions), so a mask that leaks a clean copy of a noisy token shows up
as a NELBO below -log p(x). Expectations over t and the masks are integrated exactly: every mask
pattern enumerated, t by Gauss-Legendre quadrature (the integrand t^(k-1) (1-t)^(n-k) is a
polynomial), no Monte Carlo.
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from mdlm import config as config_lib
from mdlm import diffusion, measures, schedules
from mdlm.models import Transformer, presets
from mdlm.objectives import block
from mdlm.objectives.base import Setup
from mdlm.sampling import block as block_sampler
from mdlm.sampling import denoiser_from_model
from tests.helpers import tiny_config

V, N = 3, 4           # the oracle's vocabulary and sequence length
MASK = V


def _joint(seed=0):
  return np.random.default_rng(seed).dirichlet(np.full(V ** N, 0.7)).reshape((V,) * N)


class Oracle:
  """The exact conditionals of `probs` [V]*n, read through the attention mask (module doc)."""

  def __init__(self, probs):
    self.n = probs.ndim
    self.seqs = jnp.asarray(list(itertools.product(range(V), repeat=self.n)), jnp.int32)
    self.logp = jnp.log(jnp.asarray(probs.reshape(-1), jnp.float32))

  def hidden_states(self, tokens, noise=None, *, token_mask_BxL=None, dropout_key=None,
                    causal=False, positions=None, attention_mask=None):
    del noise, dropout_key
    tokens = jnp.asarray(tokens)
    t = tokens.shape[1]
    positions = jnp.arange(t) if positions is None else jnp.asarray(positions)
    vis = jnp.ones((1, t, t), bool) if attention_mask is None else jnp.asarray(attention_mask)
    if causal:
      vis = vis & jnp.tril(jnp.ones((t, t), bool))[None]
    if token_mask_BxL is not None:
      vis = vis & jnp.asarray(token_mask_BxL, bool)[:, None, :]
    cond = (vis & (tokens != MASK)[:, None, :]).astype(jnp.float32)           # [B, Q, K]
    seq_at = self.seqs.T[jnp.clip(positions, 0, self.n - 1)]                 # [T, S]
    differ = (seq_at[None] != tokens[:, :, None]).astype(jnp.float32)        # [B, K, S]
    logw = jnp.where(jnp.einsum("bqk,bks->bqs", cond, differ) == 0, self.logp, -jnp.inf)
    onehot = jax.nn.one_hot(seq_at, V) > 0                                   # [Q, S, V]
    return jax.nn.logsumexp(jnp.where(onehot[None], logw[..., None], -jnp.inf), axis=2)

  def logits(self, hidden):
    return hidden


class OracleDenoiser:
  """What the block sampler needs of a denoiser: the model (here the oracle) and its facts."""

  time_conditioned = False

  def __init__(self, oracle):
    self.oracle, self.mask_id, self.max_length = oracle, MASK, oracle.n

  def _model(self):
    return self.oracle


def _setup(schedule=None, t_min=1e-3, settings=None):
  return Setup(schedule=schedule or schedules.LogLinear(eps=0.0), mask_id=MASK, t_min=t_min,
               objective=settings)


def _all_sequences():
  return np.asarray(list(itertools.product(range(V), repeat=N)), np.int32)


def _exact_objective_nelbo(model, x0_N, block_size, nodes=4):
  """E_{t, masks}[the bd3lm training loss] of one sequence, exactly: every mask pattern of the
  whole sequence at every Gauss-Legendre node (the same t for all blocks: the expectation of a
  sum of per-block terms needs only each block's marginal), weighted by P(pattern | t)."""
  patterns = np.asarray(list(itertools.product([False, True], repeat=N)))
  nodes_t, gauss_w = np.polynomial.legendre.leggauss(nodes)
  t_J, w_J = (nodes_t + 1) / 2, gauss_w / 2
  settings = block.BlockConfig(block_size=block_size)
  objective = block.BD3LM(settings, _setup(settings=settings))
  loss = jax.jit(lambda batch: objective.loss(model, batch, None)[0].nll_sum_B)
  total = 0.0
  for t, w in zip(t_J, w_J):
    x0 = np.broadcast_to(x0_N, patterns.shape)
    batch = {"tokens": jnp.asarray(x0), "token_mask": jnp.ones(patterns.shape, bool),
             "xt": jnp.asarray(np.where(patterns, MASK, x0)),
             "weight": jnp.full((len(patterns), N // block_size), 1.0 / t)}  # (1 - 0) w(t)
    prob = np.prod(np.where(patterns, t, 1.0 - t), axis=1)
    total += w * float(np.sum(prob * np.asarray(loss(batch), np.float64)))
  return total


@pytest.mark.parametrize("block_size", [1, 2, N])
def test_block_nelbo_of_the_exact_conditionals_is_the_nll(block_size):
  probs = _joint()
  oracle = Oracle(probs)
  for x0 in _all_sequences()[[0, 17, 40, 80]]:
    nll = -math.log(probs[tuple(x0)])
    assert _exact_objective_nelbo(oracle, x0, block_size) == pytest.approx(nll, rel=2e-5)


def test_a_leaking_mask_is_caught():
  """The same integral with a mask that lets noisy queries see their own clean copy: the oracle
  then reads the answer and the bound falls below -log p(x)."""
  probs, x0 = _joint(), _all_sequences()[40]
  leaky = np.concatenate([np.ones((N, 2 * N), bool), np.zeros((N, 2 * N), bool)])
  original = block.block_diffusion_mask
  try:
    block.block_diffusion_mask = lambda length, b: leaky
    value = _exact_objective_nelbo(Oracle(probs), x0, 2)
  finally:
    block.block_diffusion_mask = original
  assert value < -math.log(probs[tuple(x0)]) - 0.1


def _chain_rule_nll(probs, x0):
  """-sum_i log p(x_i | x_<i) from marginals of the joint, in numpy."""
  total = 0.0
  for i in range(N):
    num = probs[tuple(x0[:i + 1])].sum()
    den = probs[tuple(x0[:i])].sum()
    total -= math.log(num / den)
  return total


def test_block_size_one_is_the_autoregressive_nll():
  """b = 1: the measure's closed form, the exact expectation of the training loss and the AR NLL
  of a causal model (next-token logits of the same joint, scored by diffusion.ar_nll, plus the
  first token's marginal) agree exactly."""
  probs = _joint(1)
  oracle = Oracle(probs)
  settings = block.BlockConfig(block_size=1)
  x = jnp.asarray(_all_sequences()[[5, 33, 71]])
  batch = {"tokens": x, "token_mask": jnp.ones(x.shape, bool)}
  measured = jax.jit(lambda: block.nelbo_terms(oracle, batch, jax.random.key(0),
                                                _setup(settings=settings)))()
  # The causal model of the same joint: query q sees x_<q, so output i of the AR layout (which
  # predicts x_{i+1} from x_<=i) is the oracle's output at q = i + 1.
  strict = jnp.tril(jnp.ones((N, N), bool), -1)[None]
  cond = oracle.hidden_states(x, attention_mask=strict)            # log p(x_q | x_<q)
  ar_logits = jnp.concatenate([cond[:, 1:], jnp.zeros_like(cond[:, :1])], axis=1)
  ar = np.asarray(jnp.sum(diffusion.ar_nll(ar_logits, x), axis=1))
  first = -np.asarray(jnp.take_along_axis(cond[:, 0], x[:, :1], axis=1))[:, 0]
  for row, x0 in enumerate(np.asarray(x)):
    exact = _chain_rule_nll(probs, x0)
    assert float(measured.nll_sum_B[row]) == pytest.approx(exact, rel=1e-5)
    assert ar[row] + first[row] == pytest.approx(exact, rel=1e-5)
    assert _exact_objective_nelbo(oracle, x0, 1) == pytest.approx(exact, rel=1e-5)


@functools.lru_cache(maxsize=None)
def _tiny_model(vocab=11, length=16, seed=0, layers=2):
  """A random model, its parameters drawn in numpy from its abstract shape (the model's own
  initialisers run eagerly, seconds of one-op compiles)."""
  cfg = presets.get("tiny").replace(vocab_size=vocab, max_seq_len=length, d_model=32,
                                    num_layers=layers, num_heads=2)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape).astype(s.dtype)), state))


def test_block_size_l_is_the_mdlm_nelbo_draw_for_draw():
  model = _tiny_model()
  x0 = jax.random.randint(jax.random.key(1), (4, 16), 0, 11)
  token_mask = jnp.arange(16)[None] < jnp.asarray([16, 16, 11, 5])[:, None]
  batch = {"tokens": x0, "token_mask": token_mask}
  settings = block.BlockConfig(block_size=16)
  setup = Setup(schedule=schedules.get("loglinear"), mask_id=11, objective=settings)
  ours_fn = jax.jit(lambda key: block.nelbo_terms(model, batch, key, setup))
  mdlm_fn = jax.jit(lambda key: measures.nelbo_terms(model, batch, key, setup))
  for seed in range(3):
    ours, mdlm = ours_fn(jax.random.key(seed)), mdlm_fn(jax.random.key(seed))
    np.testing.assert_allclose(ours.nll_sum_B, mdlm.nll_sum_B, rtol=2e-5)
    np.testing.assert_array_equal(ours.num_tokens_B, mdlm.num_tokens_B)
    np.testing.assert_array_equal(ours.num_masked_B, mdlm.num_masked_B)


def _loop_logits(model, xt, x0, b):
  """One forward per block j: the clean blocks < j, then noisy block j, under block-causal
  attention (at a fixed width L, so one program serves every block: the positions after block j
  hold masks that block j cannot see)."""
  length = x0.shape[1]
  mask = jnp.asarray(block.block_causal_mask(length, b))[None]
  pos = jnp.arange(length)[None]

  @jax.jit
  def one(j):
    tokens = jnp.where(pos < j * b, x0, jnp.where(pos < (j + 1) * b, xt, 11))
    logits = model.logits(model.hidden_states(tokens, causal=False, attention_mask=mask))
    return jnp.where(pos[..., None] // b == j, logits, 0.0)

  return sum(one(j) for j in range(length // b))


@pytest.mark.slow  # the fast suite checks b = 4 through the training loss, below
@pytest.mark.parametrize("block_size", [1, 8])
def test_vectorized_pass_equals_a_loop_over_blocks(block_size):
  model = _tiny_model()
  key = jax.random.key(2)
  x0 = jax.random.randint(key, (3, 16), 0, 11)
  xt = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), x0.shape) < 0.5, 11, x0)
  vectorized = jax.jit(lambda: block.block_logits(model, xt, x0, block_size))()
  np.testing.assert_allclose(vectorized, _loop_logits(model, xt, x0, block_size), atol=2e-5)


def test_training_loss_equals_the_loop_and_draws_per_block():
  """The objective's loss on its own draw equals the loop's loss on that draw; the draw gives
  every block its own rate (stratified over rows x blocks) and masks only real tokens."""
  model = _tiny_model()
  settings = block.BlockConfig(block_size=4)
  setup = Setup(schedule=schedules.get("loglinear"), mask_id=11, objective=settings)
  objective = block.BD3LM(settings, setup)
  x0 = jax.random.randint(jax.random.key(3), (8, 16), 0, 11)
  token_mask = jnp.arange(16)[None] < 14
  batch = {"tokens": x0, "token_mask": token_mask}
  batch.update(jax.jit(lambda b: objective.draw(b, jax.random.key(4), 0, None))(batch))
  assert batch["weight"].shape == (8, 4)
  assert not np.any(np.asarray(batch["xt"])[:, 14:] == 11)
  u = np.sort(np.asarray(1.0 - setup.schedule.alpha(1.0 / batch["weight"])).reshape(-1))
  assert np.all(np.diff(np.floor(u * 32)) <= 1)  # one rate in each stratum of width 1/32
  terms, _ = jax.jit(lambda b: objective.loss(model, b, None))(batch)
  ce = diffusion.masked_cross_entropy(_loop_logits(model, batch["xt"], x0, 4), x0, 11)
  scored = (batch["xt"] == 11) & token_mask
  loop = jnp.sum(jnp.where(scored, jnp.repeat(batch["weight"], 4, 1) * ce, 0.0), axis=1)
  np.testing.assert_allclose(terms.nll_sum_B, loop, rtol=2e-5)
  np.testing.assert_array_equal(terms.num_tokens_B, 14.0)


def test_block_masks_match_their_definition():
  m = block.block_diffusion_mask(8, 2)
  for q in range(16):
    for k in range(16):
      bq, bk = (q % 8) // 2, (k % 8) // 2
      want = (bq == bk) if (q < 8 and k < 8) else (bk < bq) if q < 8 else (
          False if k < 8 else bk <= bq)
      assert m[q, k] == want, (q, k)


def test_clipped_draws_and_resampling():
  """Clipped rates lie in [beta, omega] with weight 1/rate; resampling keeps every block's
  masked fraction inside the range."""
  settings = block.BlockConfig(block_size=4, clip_min=0.3, clip_max=0.8, resample=True)
  setup = Setup(schedule=schedules.get("loglinear"), mask_id=11, objective=settings)
  objective = block.BD3LM(settings, setup)
  x0 = jnp.zeros((64, 16), jnp.int32)
  out = jax.jit(lambda b: objective.draw(b, jax.random.key(5), 0, None))(
      {"tokens": x0, "token_mask": jnp.ones(x0.shape, bool)})
  rate = 1.0 / np.asarray(out["weight"])
  assert rate.min() >= 0.3 - 1e-6 and rate.max() <= 0.8 + 1e-6
  frac = np.asarray(out["xt"] == 11).reshape(64, 4, 4).mean(-1)
  assert frac.min() >= 0.3 - 1e-6 and frac.max() <= 0.8 + 1e-6


def test_clip_search_picks_the_range_of_least_variance():
  settings = block.BlockConfig(block_size=4, clip_search=True, clip_search_widths=[0.5],
                               clip_search_delta=0.25, clip_search_every=2,
                               clip_search_batches=1)
  setup = Setup(schedule=schedules.get("loglinear"), mask_id=11, objective=settings)
  objective = block.BD3LM(settings, setup)
  cands = objective.candidates
  np.testing.assert_allclose(cands, [[1e-3, 1.0], [1e-3, 0.5], [0.25, 0.75], [0.5, 1.0]])
  state = objective.init_state()
  model = _tiny_model()
  x0 = jax.random.randint(jax.random.key(6), (4, 16), 0, 11)
  batch = {"tokens": x0, "token_mask": jnp.ones(x0.shape, bool)}
  batch.update(objective.draw(batch, jax.random.key(7), 1, state))  # step 1: search and pick
  assert bool(batch["search"][0]) and bool(batch["pick"][0])
  terms, aux = jax.jit(lambda b: objective.loss(model, b, jax.random.key(8)))(batch)
  assert aux["count"].shape == (4, len(cands)) and np.all(np.asarray(aux["count"]) == 4)
  new = objective.update_state(state, batch, terms, aux)
  s, q, n = (np.asarray(aux[k]).sum(0) for k in ("sum", "sumsq", "count"))
  assert np.asarray(new["clip"]).tolist() == pytest.approx(cands[np.argmin(q / n - (s / n) ** 2)])
  assert float(np.asarray(new["count"]).sum()) == 0.0  # reset after the pick


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("inner", [
    "ancestral", pytest.param("confidence", marks=pytest.mark.slow)])
def test_kv_cached_sampling_equals_recomputing_the_prefix(inner):
  """48 tokens from a model of max_seq_len 16 (the cache: a ring of 16 positions), after a
  prompt [EOS, 1, 2]. Within the training length the cached sampler and the one recomputing the
  prefix at every call give the same tokens (past it their contexts differ by design: module
  docstring of mdlm.sampling.block). Two layers: the second layer's cached keys depend on the
  first layer's attention to the prefix. Rows end at their first generated EOS (the given one
  does not count); the loop stops once every row has ended, leaving later blocks masked."""
  model = _tiny_model(layers=2)
  denoise = denoiser_from_model(model)
  xt = jnp.full((6, 48), 11, jnp.int32).at[:, :3].set(jnp.asarray([7, 1, 2]))
  kw = (dict(steps=6, schedule=schedules.get("loglinear")) if inner == "ancestral"
        else dict(steps=3, temperature=1.0, remasking="random"))
  out = {}
  for cached in (True, False):
    out[cached] = block_sampler.block_sample(jax.random.key(9), denoise, xt, block_size=4,
                                             mask_id=11, inner=inner, kv_cache=cached,
                                             eos_id=7, **kw)
  tokens, st = np.asarray(out[True][0]), out[True][1]
  np.testing.assert_array_equal(tokens[:, :16], np.asarray(out[False][0])[:, :16])
  assert np.all(tokens[:, :3] == [7, 1, 2])
  length = np.asarray(st["length"])
  for row, n in zip(tokens, length):
    generated_eos = np.flatnonzero(row[1:] == 7) + 1
    assert n == (generated_eos[0] + 1 if generated_eos.size else 48)
  done = int(st["blocks"]) * 4
  assert done == min(48, -(-int(length.max()) // 4) * 4) and done > 16, done
  assert not np.any(tokens[:, :done] == 11) and np.all(tokens[:, done:] == 11)
  assert int(st["clean_passes"]) == int(st["blocks"]) and int(out[False][1]["clean_passes"]) == 0
  # Cost in full passes over the 48 tokens: 4 positions per cached call (denoising steps and one
  # clean pass per block), the 16-token context window per recomputed call.
  assert int(st["positions"]) == 4 * (int(st["nfe"]) + int(st["blocks"]))
  assert float(st["nfe_equiv"]) == pytest.approx(int(st["positions"]) / 48)
  slow = out[False][1]
  assert float(slow["nfe_equiv"]) == pytest.approx(16 * int(slow["nfe"]) / 48)


@pytest.mark.parametrize("inner", [
    "confidence", pytest.param("ancestral", marks=pytest.mark.slow)])
def test_the_oracle_sampler_reproduces_the_joint(inner):
  """Block-by-block sampling with the exact conditionals draws from the joint: a chi-square test
  over all V^N outcomes (fixed seed). confidence with random remasking commits one exact draw
  per step (exact); ancestral with T = 256 unmasks two positions of a block at once with
  probability about 1/T (a bias far below what 6,000 samples resolve)."""
  probs = _joint(2)
  denoise = OracleDenoiser(Oracle(probs))
  draws = 6000
  kw = (dict(steps=2, temperature=1.0, remasking="random") if inner == "confidence"
        else dict(steps=256, schedule=schedules.LogLinear(eps=0.0)))
  tokens, _ = block_sampler.block_sample(jax.random.key(11), denoise,
                                         jnp.full((draws, N), MASK, jnp.int32), block_size=2,
                                         mask_id=MASK, inner=inner, kv_cache=False, **kw)
  index = np.ravel_multi_index(np.asarray(tokens).T, (V,) * N)
  counts = np.bincount(index, minlength=V ** N)
  _, p_value = stats.chisquare(counts, probs.reshape(-1) * draws)
  assert p_value > 1e-3, p_value


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("change, match", [
    (dict(block_size=5), "must divide the sequence length 32"),
    (dict(block_size=64), "must divide the sequence length 32"),
    (dict(block_size=0), "must divide the sequence length 32"),
    (dict(clip_min=0.7, clip_max=0.3), "clip_min"),
    (dict(resample=True), "resample"),
    (dict(clip_search=True, clip_search_widths=[]), "clip_search_widths"),
    (dict(block_size=1, clip_search=True), "already exact"),
])
def test_bad_settings_are_refused(change, match):
  cfg = tiny_config(objective=block.BlockConfig(**change))
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)


@pytest.mark.parametrize("model_change, match", [
    (dict(kind="ar"), "model.kind=denoiser"), (dict(time_conditioning=True), "time_conditioning")])
def test_models_the_objective_cannot_train_are_refused(model_change, match):
  cfg = tiny_config(objective=block.BlockConfig(block_size=4))
  cfg.model = cfg.model.replace(**model_change)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)


def test_discrete_time_with_clipping_is_refused():
  cfg = tiny_config(objective=block.BlockConfig(block_size=4, clip_min=0.2))
  cfg.noise = dataclasses.replace(cfg.noise, num_steps=100)
  with pytest.raises(ValueError, match="noise.num_steps"):
    config_lib.validate(cfg)


def test_sampler_refusals():
  model = _tiny_model()
  denoise = denoiser_from_model(model)
  xt = jnp.full((1, 16), 11, jnp.int32)
  kw = dict(mask_id=11, steps=2, schedule=schedules.get("loglinear"))
  with pytest.raises(ValueError, match="block_size"):
    block_sampler.block_sample(jax.random.key(0), denoise, xt, block_size=0, **kw)
  with pytest.raises(ValueError, match="multiple of block_size"):
    block_sampler.block_sample(jax.random.key(0), denoise, xt, block_size=4, context=10, **kw)
  with pytest.raises(ValueError, match="runs the model itself"):
    block_sampler.block_sample(jax.random.key(0), lambda x, t: x, xt, block_size=4, **kw)
  with pytest.raises(ValueError, match="inner"):
    block_sampler.block_sample(jax.random.key(0), denoise, xt, block_size=4, inner="semi_ar", **kw)
  timed = nnx.eval_shape(lambda: Transformer(model.cfg.replace(time_conditioning=True),
                                             rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="time-conditioned"):
    block_sampler.block_sample(jax.random.key(0), denoiser_from_model(timed, schedules.get(
        "loglinear")), xt, block_size=4, **kw)


# ----------------------------------------------------------------------------- the CLIs


def test_sample_cli_takes_the_block_size_from_a_bd3lm_run():
  from mdlm import sample
  from mdlm.sampling import config as sample_config
  tokenizer = type("Tok", (), {"eos_id": 257})()
  s = sample_config.SamplerConfig(name="block")
  got = sample._block_settings(s, tiny_config(objective=block.BlockConfig(block_size=8)),
                               tokenizer)
  assert got == {"block_size": 8, "context": 32, "eos_id": 257}
  got = sample._block_settings(dataclasses.replace(s, block_size=16, stop_at_eos=False),
                               tiny_config(objective="diffusion"), tokenizer)
  assert got == {"block_size": 16, "context": 32, "eos_id": None}
  with pytest.raises(ValueError, match="sampler.block_size"):
    sample._block_settings(s, tiny_config(objective="diffusion"), tokenizer)
  with pytest.raises(ValueError, match="guidance is not supported with sampler=block"):
    sample_config.validate(sample_config.SampleConfig(run="r", sampler=dataclasses.replace(
        s, guidance=1.0), prompt="To be"))


@pytest.mark.slow
def test_train_evaluate_and_sample_a_bd3lm_run(tmp_path):
  """End to end: a tiny bd3lm run trains, `mdlm.evaluate` reports its block NELBO, and
  `mdlm.sample sampler=block` writes samples past the training length that stop at EOS."""
  from mdlm import evaluate, sample, train
  from mdlm.sampling import config as sample_config
  run = str(tmp_path / "run")
  train.run(tiny_config(objective=block.BlockConfig(block_size=8), steps=4, eval_every=4,
                        checkpoint_every=4), run)
  result = evaluate.evaluate_run(evaluate.EvalConfig(run=run, max_batches=2, progress=False))
  assert result["measure"] == "bd3lm" and 0 < result["nll"] < math.log(259) + 0.5
  cfg = sample_config.SampleConfig(run=run, sampler=sample_config.SamplerConfig(
      name="block", steps=4), num_samples=3, batch_size=3, length=80, progress=False,
      output=str(tmp_path / "s.jsonl"))
  summary = sample.run(cfg)
  assert 0 < summary["nfe_equiv_per_batch"] < summary["nfe_per_batch"]  # b of 80 per call
  for item in summary["samples"]:
    assert 1 <= item["length"] <= 80 and len(item["tokens"]) == 80
    assert item["tokens"][0] == 256  # BOS

