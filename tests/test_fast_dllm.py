"""mdlm.sampling.fast_dllm: Fast-dLLM's prefix and dual KV caches on the confidence sampler.

The caches are approximations, so the tests pin them by the identities that hold exactly (a
refresh at every step, or windows that leave nothing stale, is the uncached sampler; with nothing
after the block the dual cache is the prefix cache) and by a slow reference that recomputes the
cache with explicit full passes at block boundaries, in a Python loop with a numpy commit rule.
The model is a tiny random one of two layers (with one, keys and values depend on their own
token only and the caches are exact, a test below) with sharpened attention and head, so that
stale keys/values do change its predictions (checked: each cached run differs from the uncached
one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm import schedules
from mdlm.models import build, kv_cache, presets
from mdlm.sampling import confidence_sampler, denoisers, fast_dllm, run_sampler
from mdlm.sampling import config as sample_config

V, L, P = 29, 12, 4  # vocabulary, length, prompt length
MASK = V


def _sharp_model(seed=1, **kw):
  """A tiny random denoiser whose attention logits and output logits are scaled up."""
  model = build(presets.get("tiny", vocab_size=V, max_seq_len=L, d_model=32, num_layers=2, **kw),
                seed=seed)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def scale(tree):
    for name, value in tree.items():
      if isinstance(value, dict):
        scale(value)
      elif name in ("w_qkv", "embed"):
        tree[name] = value * 3.0

  scale(params)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return _sharp_model()


def _prompted(batch=2):
  xt = np.full((batch, L), MASK, np.int32)
  xt[:, :P] = np.arange(1, P + 1)
  return xt


KEY = jax.random.key(3)


def _both(denoise, xt, **kw):
  """(uncached, cached) results of the same settings."""
  kv = {k: kw.pop(k) for k in ("kv_cache", "kv_refresh")}
  plain = confidence_sampler.confidence(KEY, denoise, xt, mask_id=MASK, **kw)
  cached = fast_dllm.cached_confidence(KEY, denoise, xt, mask_id=MASK, **kv, **kw)
  return plain, cached


# The settings most tests share (one compile each of the uncached, prefix and dual programs):
# 8 masked positions after the prompt, two blocks of 4, three steps each.
SETTINGS = dict(steps=6, block_length=4, threshold=0.3)


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_a_refresh_at_every_step_is_the_uncached_sampler(model, kind):
  """kv_refresh=1 makes every step a full pass: the uncached sampler, token for token."""
  denoise = denoisers.denoiser_from_model(model)
  (a, sa), (b, sb) = _both(denoise, _prompted(), kv_cache=kind, kv_refresh=1, **SETTINGS)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(sa["fill_step"], sb["fill_step"])
  assert int(sa["nfe"]) == int(sb["nfe"]) == int(sb["refreshes"])
  assert float(sb["nfe_equiv"]) == int(sb["nfe"])


def _time_conditioned_guided():
  tc = _sharp_model(seed=2, time_conditioning=True)
  return denoisers.guided(denoisers.denoiser_from_model(tc, schedules.LogLinear()),
                          _prompted()[0] != MASK, 1.5)


def test_the_cached_passes_of_wrapped_denoisers():
  """Guidance over a time-conditioned model, as the sampler calls it (at the time of the input's
  masked fraction): kv_fill gives the features pass; a window against the cache of the same
  sequence is that pass at its positions (nothing is stale), for both guidance branches. The
  window [4, 8) is all masks, so a window read at its own masked fraction would differ."""
  denoise = _time_conditioned_guided()
  assert denoisers.has_kv_cache(denoise) and not denoisers.has_kv_cache(lambda x, t: x)
  wrapped = denoisers.at_masked_fraction(denoise, MASK)
  xt = _prompted()
  xt[:, 9] = 7  # a masked fraction of 7/12 for the sequence, 1 for the window
  t_B = jnp.zeros((2,), jnp.float32)

  @jax.jit
  def passes(x):
    cache, filled = wrapped.kv_fill(x, t_B)
    return wrapped.features(x, t_B), filled, wrapped.kv_window(cache, x, 4, 4, t_B)

  features, filled, window = passes(jnp.asarray(xt))
  assert features.shape[0] == 4  # both branches
  np.testing.assert_allclose(filled, features, atol=1e-5)
  np.testing.assert_allclose(window, features[:, 4:8], atol=1e-5)


@pytest.mark.slow
def test_a_refresh_at_every_step_under_guidance_and_time_conditioning():
  denoise = _time_conditioned_guided()
  kw = dict(SETTINGS, temperature=1.0)
  (a, _), (b, _) = _both(denoise, _prompted(), kv_cache="dual", kv_refresh=1, **kw)
  np.testing.assert_array_equal(a, b)


def _second_attention_off(model):
  """The same model (same program) with its second layer's attention output zeroed: every key
  and value that still matters is the first layer's, a function of its own position's token."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  params["blocks"][1]["attn"]["w_out"] = params["blocks"][1]["attn"]["w_out"] * 0.0
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_context_free_keys_make_the_caches_exact(model, kind):
  """Inside a block only the block's tokens change. When keys and values depend on their own
  position's token alone (one attention layer), nothing cached is stale: both caches are the
  uncached sampler exactly, refreshing only at block boundaries."""
  denoise = denoisers.denoiser_from_model(_second_attention_off(model))
  (a, sa), (b, sb) = _both(denoise, _prompted(), kv_cache=kind, kv_refresh=0, **SETTINGS)
  np.testing.assert_array_equal(a, b)
  assert int(sb["refreshes"]) == 2 and int(sb["nfe"]) == int(sa["nfe"]) > 2


def test_with_nothing_after_the_block_dual_is_prefix(model):
  """A prompt, then one block to the end of the sequence: the dual window and the prefix window
  are both [P, L), so the two caches give the same tokens; not those of the uncached sampler (the
  prompt's cached keys are stale: the prompt attends to the generation). With no prompt the
  window is the whole sequence and the caches are exact."""
  denoise = denoisers.denoiser_from_model(model)
  kw = dict(steps=6, block_length=L - P, threshold=0.3)
  outs = {k: fast_dllm.cached_confidence(KEY, denoise, _prompted(), mask_id=MASK, kv_cache=k,
                                         **kw) for k in ("prefix", "dual")}
  np.testing.assert_array_equal(outs["prefix"][0], outs["dual"][0])
  assert float(outs["prefix"][1]["nfe_equiv"]) == float(outs["dual"][1]["nfe_equiv"])
  uncached = _reference(model, _prompted(), kind="none", steps_per_block=6, block_length=L - P,
                        threshold=0.3)
  assert not np.array_equal(uncached, outs["dual"][0])
  xt = np.full((2, L), MASK, np.int32)
  spec = confidence_sampler.prepare(xt, denoise, mask_id=MASK, temperature=0.0,
                                    remasking="low_confidence", **dict(kw, block_length=L))[1]
  assert fast_dllm.block_windows(xt, spec, "prefix") == fast_dllm.block_windows(
      xt, spec, "dual") == ((0, L),)


def _commit_np(logits_BxLxV, x, candidate_BxL, k_B, threshold):
  """The commit rule, independently: argmax, its log-probability, the k most confident (ties:
  leftmost) and every one at least as confident as the threshold."""
  for b in range(x.shape[0]):
    idx = np.nonzero(candidate_BxL[b])[0]
    if not len(idx):
      continue
    logits = logits_BxLxV[b, idx].astype(np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    token, conf = log_p.argmax(1), log_p.max(1)
    count = max(k_B[b], int(np.sum(conf >= np.log(threshold))))
    chosen = np.argsort(-conf, kind="stable")[:count]
    x[b, idx[chosen]] = token[chosen]


def _reference(model, xt, *, kind, steps_per_block, block_length, threshold, boundaries=True):
  """Fast-dLLM's loop: per block, an explicit full pass (kv_cache.forward_window over every
  position) fills the cache and serves the first step; the other steps run the block (dual) or
  the block and all after it (prefix) against that cache; kind "none": a full pass every step
  (the uncached sampler). boundaries=False: the cache of the first block is kept for all (what
  the sampler must not do)."""
  x = np.array(xt)
  batch = x.shape[0]
  masked = x == MASK
  block_BxL = np.where(masked, (np.cumsum(masked, 1) - 1) // block_length, -1)
  everything = jnp.ones((1, 1, L), bool)
  full = jax.jit(lambda t: kv_cache.forward_window(model, kv_cache.init_cache(model, batch, L), t,
                                                   0, everything))
  part = jax.jit(lambda c, t, s: kv_cache.forward_window(model, c, t, s, everything,
                                                         write=False)[1])
  cache = None
  for j in range(block_BxL.max() + 1):
    cols = np.nonzero((block_BxL == j).any(0))[0]
    lo, hi = cols[0], (L if kind == "prefix" else cols[-1] + 1)
    for s in range(steps_per_block):
      candidate = (x == MASK) & (block_BxL == j)
      if not candidate.any():
        break
      logits = np.zeros((batch, L, V), np.float32)
      if kind == "none" or (s == 0 and (boundaries or cache is None)):
        cache, hidden = full(jnp.asarray(x))
        logits[:] = model.logits(hidden)
      else:
        logits[:, lo:hi] = model.logits(part(cache, jnp.asarray(x[:, lo:hi]), lo))
      remaining = candidate.sum(1)
      _commit_np(logits, x, candidate, -(-remaining // (steps_per_block - s)), threshold)
  return x


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_the_cache_is_refilled_at_block_boundaries(model, kind):
  """Token for token the slow reference; not the reference that keeps the first block's cache,
  and not the uncached sampler (so each of the three comparisons can fail). The cost counters:
  one full pass per block, every other call over its window (dual: the block, 4 positions;
  prefix: from the block to the end)."""
  denoise = denoisers.denoiser_from_model(model)
  xt = _prompted()
  kw = SETTINGS
  tokens, stats = fast_dllm.cached_confidence(KEY, denoise, xt, mask_id=MASK, kv_cache=kind, **kw)
  ref = dict(kind=kind, steps_per_block=3, block_length=4, threshold=0.3)
  np.testing.assert_array_equal(tokens, _reference(model, xt, **ref))
  assert not np.array_equal(tokens, _reference(model, xt, boundaries=False, **ref))
  plain, _ = confidence_sampler.confidence(KEY, denoise, xt, mask_id=MASK, **kw)
  assert not np.array_equal(tokens, plain)
  assert int(stats["refreshes"]) == 2
  windows = fast_dllm.block_windows(xt, confidence_sampler.prepare(
      xt, denoise, temperature=0.0, remasking="low_confidence", mask_id=MASK, **kw)[1], kind)
  assert windows == (((4, 8), (8, 4)) if kind == "prefix" else ((4, 4), (8, 4)))
  width_S = np.asarray(stats["slab_width"]) > 0  # the steps that ran
  block_S = np.asarray(confidence_sampler.prepare(
      xt, denoise, temperature=0.0, remasking="low_confidence", mask_id=MASK, **kw)[1]
      .block_of_step)
  first_S = np.r_[True, block_S[1:] != block_S[:-1]]
  expected = sum(L if first_S[i] else windows[block_S[i]][1] for i in np.nonzero(width_S)[0])
  assert int(stats["positions"]) == expected and int(stats["nfe"]) == width_S.sum()
  assert float(stats["nfe_equiv"]) == pytest.approx(expected / L)


def test_windows_of_a_ragged_layout():
  """Rows with different prompts: block j's window spans its positions in every row."""
  xt = np.full((2, 10), MASK, np.int32)
  xt[0, :2] = 1
  xt[1, :4] = 1
  spec = confidence_sampler.Spec(steps=2, mask_id=MASK, block_length=3, block_of_step=(0, 1),
                                 step_in_block=(0, 0), steps_in_block=(1, 1, 1), threshold=None,
                                 temperature=0.0, remasking="low_confidence")
  # row 0: masked 2..9 -> blocks [2,5), [5,8), [8,10); row 1: 4..9 -> [4,7), [7,10)
  assert fast_dllm.block_windows(xt, spec, "dual") == ((2, 5), (5, 5), (8, 2))
  assert fast_dllm.block_windows(xt, spec, "prefix") == ((2, 8), (5, 5), (8, 2))


def test_bad_settings_are_refused_before_compiling(model, monkeypatch):
  def no_compile(*args, **kw):
    raise AssertionError("compiled")
  monkeypatch.setattr(fast_dllm, "_cached_jit", no_compile)
  denoise = denoisers.denoiser_from_model(model)
  xt = _prompted()
  kw = dict(steps=6, mask_id=MASK, block_length=4)
  cases = [
      (dict(kv_cache="both"), "kv_cache must be one of"),
      (dict(kv_refresh=-1), "kv_refresh must be an integer >= 0"),
      (dict(kv_refresh=True), "kv_refresh must be an integer"),
      (dict(kv_cache="none", kv_refresh=2), "set kv_cache='prefix' or 'dual'"),
      (dict(block_length=None), "needs block_length"),
      (dict(steps=1), "fewer than the 2 blocks"),
  ]
  for extra, message in cases:
    with pytest.raises(ValueError, match=message):
      fast_dllm.cached_confidence(KEY, denoise, xt, **{**kw, **extra})
  with pytest.raises(ValueError, match="needs a denoiser with keys and values"):
    fast_dllm.cached_confidence(KEY, lambda x, t: jnp.zeros(x.shape + (V,)), xt, **kw)
  with pytest.raises(ValueError, match="pass a concrete xt"):
    jax.jit(lambda x: fast_dllm.cached_confidence(KEY, denoise, x, **kw))(xt)


def test_the_cli_settings_compose_validate_and_route(model):
  """`sampler=fast_dllm sampler.kv_cache=dual` composes with Hydra, validates and reaches the
  cached sampler through run_sampler; the preset alone stays the uncached sampler; bad settings
  are refused by the config's validation, before anything loads."""
  from hydra import compose, initialize_config_dir
  from omegaconf import OmegaConf
  from mdlm import sample
  sample_config.register_configs()
  with initialize_config_dir(config_dir=sample._config_path(), version_base=None):
    cfg = OmegaConf.to_object(compose("sample", overrides=[
        "run=r", "sampler=fast_dllm", "sampler.kv_cache=dual", "sampler.steps=6",
        "sampler.block_length=4", "sampler.threshold=0.3"]))
    plain = OmegaConf.to_object(compose("sample", overrides=["run=r", "sampler=fast_dllm"]))
  sample_config.validate(cfg)
  settings = cfg.sampler.settings(None, MASK)
  assert settings["kv_cache"] == "dual" and settings["kv_refresh"] == 0
  assert "kv_cache" not in plain.sampler.settings(None, MASK)
  denoise = denoisers.denoiser_from_model(model)
  routed, stats = run_sampler(KEY, denoise, _prompted(), sampler="confidence", **settings)
  direct, _ = fast_dllm.cached_confidence(KEY, denoise, _prompted(), **settings)
  np.testing.assert_array_equal(routed, direct)
  assert "refreshes" in stats
  bad = [({"kv_cache": "both"}, "choose one of"),
         ({"kv_cache": "dual", "block_length": None}, "set sampler.block_length"),
         ({"kv_refresh": 2}, "sampler.kv_refresh=2 refreshes a KV cache"),
         ({"kv_cache": "dual", "kv_refresh": -1}, "must be >= 0"),
         ({"kv_cache": "prefix", "name": "semi_ar"}, "not sampler=semi_ar")]
  for change, message in bad:
    s = sample_config.SamplerConfig(name="confidence", block_length=4)
    for k, v in change.items():
      setattr(s, k, v)
    with pytest.raises(ValueError, match=message):
      sample_config.validate(sample_config.SampleConfig(run="r", sampler=s))


@pytest.mark.slow
def test_the_cli_samples_with_the_dual_cache(tiny_run):
  from tests.helpers import run_python
  proc = run_python(["-m", "mdlm.sample", f"run={tiny_run}", "sampler=fast_dllm",
                     "sampler.kv_cache=dual", "sampler.block_length=8", "num_samples=2",
                     "batch_size=2", "length=32", "progress=false", "prompt=To be"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote 2 samples" in proc.stderr and '"kv_cache": "dual"' in proc.stderr
