"""KV-cached AR decoding, MEAP masking and the MARIA head (tiny models only)."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mdlm import meap
from mdlm.data import sft
from mdlm import schedules
from mdlm.models import ar, build, hybrid, presets
from mdlm.objectives import maria as maria_objective
from mdlm.sampling.maria import maria_infill

V = 37
L = 12


def _model(kind, seed, **overrides):
  fields = dict(kind=kind, vocab_size=V, max_seq_len=L, num_layers=2, d_model=32, num_heads=2)
  return build(presets.get("tiny", **{**fields, **overrides}), seed=seed)


def _abstract(kind, **overrides):
  """Shapes only (for input checks that fail before any computation)."""
  return nnx.eval_shape(lambda: _model(kind, 0, **overrides))


@nnx.jit
def _forward(model, *args):
  return model(*args)


@nnx.jit
def _hidden(model, tokens):
  return model.hidden_states(tokens)


@pytest.fixture(scope="module")
def ar_model():
  return _model("ar", 1)


@pytest.fixture(scope="module")
def head(ar_model):
  # Widths differ (48 vs 32) so a mix-up of the two halves of W cannot go unnoticed.
  return hybrid.build_maria(_model("denoiser", 2, d_model=48, num_heads=3), ar_model)


def _tokens(seed, shape=(4, L)):  # one batch shape: shared compilations
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


# ---------------------------------------------------------------- KV-cached decoding


def test_cached_logits_equal_uncached_forward(ar_model):
  x = _tokens(0)
  full = _forward(ar_model, x)
  cached = ar.cached_logits(ar_model, x, prompt_len=4)  # 4 prefilled, then 8 one-token steps
  assert cached.shape == full.shape
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


def test_cached_logits_other_architecture():
  model = _model("ar", 4, mlp="swiglu", norm="rmsnorm", tie_embeddings=True)
  x = _tokens(1)
  np.testing.assert_allclose(ar.cached_logits(model, x, prompt_len=1), _forward(model, x),
                             atol=2e-5, rtol=1e-5)


def test_greedy_generate_equals_uncached_argmax_loop(ar_model):
  prompt = _tokens(2, (4, 4))
  out = ar.generate(ar_model, jax.random.key(0), prompt, max_new_tokens=L - 4, temperature=0.0)
  seq = np.zeros((4, L), np.int32)  # causal: the zeros after position n do not affect it
  seq[:, :4] = prompt
  for n in range(4, L):
    seq[:, n] = np.argmax(_forward(ar_model, seq)[:, n - 1], axis=-1)
  np.testing.assert_array_equal(out, seq)


def test_cache_shapes_are_static(ar_model):
  cfg = ar_model.cfg
  cache = ar.init_cache(ar_model, 2, L)
  expected = [(2, L, cfg.num_heads, cfg.head_dim)] * cfg.num_layers
  assert [k.shape for k in cache.k] == expected == [v.shape for v in cache.v]
  cache, hidden = jax.jit(lambda c, t: ar.prefill(ar_model, t, c))(cache, _tokens(3, (2, 5)))
  assert [k.shape for k in cache.k] == expected and hidden.shape == (2, 5, cfg.d_model)
  step = jax.jit(lambda c, t, p: ar.decode_step(ar_model, c, t, p))
  for pos in range(5, 8):  # one compilation serves every position (position is traced)
    cache, hidden = step(cache, jnp.zeros((2,), jnp.int32), pos)
    assert [k.shape for k in cache.k] == expected and hidden.shape == (2, cfg.d_model)
  assert step._cache_size() == 1


def test_prompt_longer_than_model_refused(ar_model):
  with pytest.raises(ValueError, match="max_seq_len"):
    ar.generate(ar_model, jax.random.key(0), _tokens(0, (1, L + 1)), max_new_tokens=1)
  with pytest.raises(ValueError, match="max_new_tokens"):
    ar.generate(ar_model, jax.random.key(0), _tokens(0, (1, L - 2)), max_new_tokens=3)
  with pytest.raises(ValueError, match="max_seq_len"):
    ar.init_cache(ar_model, 1, L + 1)
  with pytest.raises(ValueError, match="causal"):
    ar.generate(_abstract("denoiser"), jax.random.key(0), _tokens(0, (1, 2)), max_new_tokens=1)


def test_sample_logits_greedy_and_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  greedy = ar.sample_logits(jax.random.key(0), logits, 0.0, 1.0)
  assert (greedy == 0).all()
  # top_p = 0.7: the nucleus is {0, 1} (mass before token 2 is 0.8 >= 0.7), renormalised 5/8, 3/8.
  draws = np.asarray(ar.sample_logits(jax.random.key(1), logits, 1.0, 0.7))
  assert set(np.unique(draws)) == {0, 1}
  assert abs((draws == 0).mean() - 0.625) < 0.03
  # top_p = 1, temperature 1: the full distribution.
  draws = np.asarray(ar.sample_logits(jax.random.key(2), logits, 1.0, 1.0))
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)


# ---------------------------------------------------------------- MEAP


def _meap_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, V, (16, 40)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  lengths = rng.integers(5, 41, 16)
  for b, n in enumerate(lengths):
    mask[b, n:] = False
    tokens[b, n:] = 2  # pad id
  tokens[:, 0] = 1      # BOS
  tokens[3, 17] = 1     # a BOS inside a packed window
  return tokens, mask


def test_mask_count_rounds_exactly():
  eligible = np.arange(0, 200)
  for ratio in (0.05, 0.1, 0.15, 0.2, 0.5, 0.35):
    expected = [(e * round(ratio * 100) + 50) // 100 for e in eligible]  # integers: exact
    np.testing.assert_array_equal(meap.mask_count(eligible, ratio), expected)
  assert int(meap.mask_count(10, 0.15)) == 2 and int(meap.mask_count(10, 0.05)) == 1


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.5])
def test_meap_masks_exact_count_never_bos_pad_last(ratio):
  tokens, mask = _meap_batch()
  inputs, masked = meap.meap_mask(jax.random.key(0), tokens, mask, ratio=ratio, mask_id=V,
                                  bos_id=1)
  inputs, masked = np.asarray(inputs), np.asarray(masked)
  for b in range(tokens.shape[0]):
    eligible = [i for i in range(tokens.shape[1] - 1)
                if mask[b, i] and mask[b, i + 1] and tokens[b, i] != 1]
    assert masked[b].sum() == (len(eligible) * round(ratio * 100) + 50) // 100  # halves up
    assert set(np.flatnonzero(masked[b])) <= set(eligible)
  assert not masked[:, -1].any() and not masked[~mask].any() and not masked[tokens == 1].any()
  np.testing.assert_array_equal(inputs, np.where(masked, V, tokens))


def test_meap_patterns_differ_across_sequences_and_are_uniform():
  tokens = np.full((64, 21), 5, np.int32)  # identical rows: any difference comes from the draw
  inputs, masked = meap.meap_mask(jax.random.key(1), tokens, None, ratio=0.2, mask_id=V,
                                  bos_id=None)
  masked = np.asarray(masked)
  assert (masked.sum(1) == 4).all()  # round(0.2 * 20)
  assert len({tuple(row) for row in masked}) > 50
  # Every eligible position is masked with probability 4/20 (pooled over 64 rows x 50 draws).
  counts = np.zeros(21)
  for seed in range(50):
    counts += np.asarray(meap.meap_mask(jax.random.key(seed), tokens, None, ratio=0.2, mask_id=V,
                                        bos_id=None)[1]).sum(0)
  freq = counts[:20] / (64 * 50)
  assert counts[20] == 0 and np.abs(freq - 0.2).max() < 0.03


def test_meap_loss_targets_are_clean_tokens(ar_model):
  tokens = np.array(_tokens(5, (4, L)))
  tokens[:, 0] = 1
  batch = {"tokens": tokens}
  key = jax.random.key(3)
  from mdlm import objectives
  from mdlm.objectives.meap import MEAPConfig
  setup = objectives.Setup(schedule=schedules.get("loglinear"), mask_id=V, bos_id=1)
  objective = objectives.build(MEAPConfig(ratio=0.3), setup)
  batch = {**batch, "token_mask": np.ones(tokens.shape, bool)}
  batch.update(objective.draw(batch, key, 0, None))  # masks with fold_in(key, 1)
  terms, _ = nnx.jit(lambda m, b: objective.loss(m, b, None))(ar_model, batch)
  nll_sum, count = terms.nll_sum_B.sum(), terms.num_tokens_B.sum()
  inputs, masked = meap.meap_mask(jax.random.fold_in(key, 1), tokens, None, ratio=0.3,
                                  mask_id=V, bos_id=1)
  assert np.asarray(masked).sum() > 0
  np.testing.assert_array_equal(terms.num_masked_B, np.asarray(masked).sum(1))
  logp = np.asarray(jax.nn.log_softmax(_forward(ar_model, inputs), axis=-1))
  expected = -sum(logp[b, i, tokens[b, i + 1]] for b in range(4) for i in range(L - 1))
  assert count == 4 * (L - 1)
  np.testing.assert_allclose(nll_sum, expected, rtol=1e-5)


def test_meap_sft_examples():
  prompt, response = [1, 4, 5, 6], list(range(7, 7 + 60))
  ex = sft.sft_examples(prompt, response, mask_id=V + 100, eos_id=2, ratio=0.1,
                         rng=random.Random(0))
  assert len(ex) == 2
  plain, masked = ex
  assert plain.inputs == prompt + response + [2]
  assert plain.labels == [sft.IGNORE] * 4 + response + [2]
  positions = [i for i, t in enumerate(masked.inputs) if t == V + 100]
  assert len(positions) == 6 and min(positions) >= len(prompt)  # round(0.1 * 60)
  for i, (tok, lab) in enumerate(zip(masked.inputs, masked.labels)):
    if i in positions:
      assert lab == (prompt + response)[i]
    else:
      assert lab == sft.IGNORE and tok == (prompt + response + [2])[i]
  assert len(sft.sft_examples(prompt, response[:30], mask_id=99, eos_id=2)) == 1
  short = sft.sft_examples(prompt, response, mask_id=99, eos_id=2, max_len=20)
  assert all(len(e.inputs) == 20 and e.inputs[-1] == 2 for e in short)


def test_meap_sft_loss_counts_only_labels(ar_model):
  prompt, response = [1, 4, 5], list(np.random.default_rng(0).integers(3, V, 8))
  ex = sft.sft_examples(prompt, response, mask_id=V, eos_id=2, ratio=0.3, min_response_len=4)
  batch = sft.pad_examples(ex, L, pad_id=0)
  nll, count = nnx.jit(meap.sft_loss)(ar_model, batch)
  assert count == (len(response) + 1) + 2  # + the masked copy's round(0.3 * 8) labels
  logits = nnx.jit(lambda m, t, k: m(t, token_mask_BxL=k))(ar_model, batch["tokens"],
                                                           batch["token_mask"])
  logp = np.asarray(jax.nn.log_softmax(logits))
  expected = -sum(logp[b, i - 1, batch["labels"][b, i]] for b in range(2) for i in range(1, L)
                  if batch["labels"][b, i] != sft.IGNORE)
  np.testing.assert_allclose(nll, expected, rtol=1e-5)


# ---------------------------------------------------------------- MARIA


def _masked(x0, seed, ratio=0.5):
  return jnp.where(jax.random.uniform(jax.random.key(seed), x0.shape) < ratio, V, x0)


def test_initial_head_is_product_of_experts(head):
  x0 = _tokens(6)
  xt = _masked(x0, 7)
  logits = _forward(head, x0, xt)
  assert logits.shape == (4, L, V)  # V real tokens: no output for the mask
  ar_logits, mlm_logits = _forward(head.ar, x0), _forward(head.denoiser, xt)
  poe = (ar_logits[:, :-1] + mlm_logits[:, 1:]) / 2
  np.testing.assert_allclose(jax.nn.log_softmax(logits[:, 1:]), jax.nn.log_softmax(poe),
                             atol=1e-5)
  # Position 0 has no AR state: the denoiser expert alone (at half weight).
  np.testing.assert_allclose(logits[:, 0], mlm_logits[:, 0] / 2, atol=1e-5)


def test_alignment_ar_state_i_minus_1_with_mlm_state_i(head):
  """Handmade: x0 = [5, 7, 9, ..., 27], xt masks positions 1, 3, 5 and 11. The head at i must
  combine the AR state after reading x0[:i] (read from a sequence that agrees with x0 only before
  i) with the denoiser state at i."""
  x0 = jnp.tile(jnp.arange(5, 5 + 2 * L, 2)[None], (4, 1))
  xt = x0.at[:, jnp.array([1, 3, 5, 11])].set(V)
  w = jax.random.normal(jax.random.key(0), head.w.shape)
  probe = hybrid.build_maria(head.denoiser, head.ar)
  probe.w[...] = w
  logits = _forward(probe, x0, xt)
  d_ar = head.ar.cfg.d_model
  h_mlm = _hidden(head.denoiser, xt)
  for i in (1, 3, 5, 11):
    h_prefix = _hidden(head.ar, x0.at[:, i:].set(30))[0, i - 1]
    expected = h_prefix @ w[:d_ar] + h_mlm[0, i] @ w[d_ar:]
    np.testing.assert_allclose(logits[0, i], expected, atol=1e-4, rtol=1e-4)
  # Causality of the AR part: changing x0 at j = 3 leaves positions <= 3 untouched.
  logits2 = _forward(probe, x0.at[:, 3].set(20), xt)
  np.testing.assert_allclose(logits2[0, :4], logits[0, :4], atol=1e-6)
  assert not np.allclose(logits2[0, 4], logits[0, 4], atol=1e-4)


def test_training_updates_w_only(head):
  head = hybrid.build_maria(head.denoiser, head.ar)
  backbone_before = jax.tree.map(np.array, nnx.state(head, nnx.Not(hybrid.TRAINABLE)))
  w_before = np.array(head.w[...])
  optimizer = nnx.Optimizer(head, optax.adamw(1e-2, weight_decay=0.1), wrt=hybrid.TRAINABLE)
  schedule = schedules.get("loglinear")
  batch = {"tokens": _tokens(8)}

  @nnx.jit
  def step(head, optimizer, batch, key):
    def loss_fn(head):
      terms = maria_objective.maria_loss(head, batch, key, schedule=schedule)
      return terms.nll_sum_B.sum() / jnp.maximum(terms.num_tokens_B.sum(), 1)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, hybrid.TRAINABLE))(head)
    optimizer.update(head, grads)
    return loss

  losses = [float(step(head, optimizer, batch, jax.random.key(s % 2))) for s in range(8)]
  assert losses[-1] < losses[0]  # the same two draws, revisited: W fits them
  backbone_after = nnx.state(head, nnx.Not(hybrid.TRAINABLE))
  for a, b in zip(jax.tree.leaves(backbone_before), jax.tree.leaves(backbone_after)):
    np.testing.assert_array_equal(a, np.asarray(b))  # bit-identical
  assert not np.array_equal(w_before, np.asarray(head.w[...]))
  assert len(jax.tree.leaves(nnx.state(head, hybrid.TRAINABLE))) == 1


def _maria_objective():
  from mdlm import objectives
  from mdlm.objectives.maria import MariaConfig
  return objectives.build(MariaConfig(), objectives.Setup(schedule=schedules.get("loglinear"),
                                                         mask_id=V))


def test_trainer_step_updates_w_only(head):
  """The trainer's own step (mdlm.train) with objective=maria, EMA on and weight decay on: after
  a few steps the backbones are bit-identical in both the parameters and their EMA."""
  from mdlm import config as config_lib, sharding, train
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.rules_dict(config_lib.MeshConfig().rules)
  spec = train.given_spec(head, head.ar.cfg, mesh, rules)
  optim = config_lib.OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, ema=0.9)
  tx = maria_objective.freeze_backbones(train.make_optimizer(optim, 10), spec.initial_params)
  objective = _maria_objective()
  state, shardings = train.init_state(spec, tx, 0, mesh)
  step = train.make_train_step(spec, tx, objective, optim.ema, 1, shardings, mesh)
  batch = {"tokens": np.asarray(_tokens(14, (4, L)), np.int32),
           "token_mask": np.ones((4, L), bool)}
  for _ in range(3):
    state, metrics = step(state, sharding.global_batch(batch, mesh))
  assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 3
  before = spec.initial_params
  for which in ("params", "ema"):
    for part in ("ar", "denoiser"):
      for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(state[which][part])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(before["w"]), np.asarray(state[which]["w"]))
  # Adam moments exist for W alone.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) >= 1]
  assert moments and all(np.shape(x) == before["w"].shape for x in moments)


def test_maria_train_loss_and_validation_are_per_masked_token(head):
  """The trainer's MARIA loss is normalised by the masked tokens of its own draw (the unit of
  maria_loss and of validation), and validation with several draws pools sums and counts."""
  from mdlm import config as config_lib, measures, sharding, train
  from mdlm.evaluate import make_eval_step
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.rules_dict(config_lib.MeshConfig().rules)
  spec = train.given_spec(head, head.ar.cfg, mesh, rules)
  optim = config_lib.OptimConfig(lr=1e-2, warmup_steps=0, ema=0.0)
  tx = maria_objective.freeze_backbones(train.make_optimizer(optim, 10), spec.initial_params)
  objective = _maria_objective()
  state, shardings = train.init_state(spec, tx, 0, mesh)
  token_mask = np.ones((4, L), bool)
  token_mask[2, -4:] = False
  batch = {"tokens": np.asarray(_tokens(16, (4, L)), np.int32), "token_mask": token_mask}
  # The step's own draw: key = fold_in(rng, step), masking with fold_in(key, 0).
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
  drawn = objective.draw(batch, key, 0, None)
  num_masked = int(np.sum((np.asarray(drawn["xt"]) == V) & token_mask))
  loss_fn = nnx.jit(lambda h, b: objective.loss(h, b, jax.random.key(0))[0])
  terms = loss_fn(head, {**batch, **drawn})
  assert 0 < num_masked < token_mask.sum() and float(np.sum(terms.num_tokens_B)) == num_masked
  step = train.make_train_step(spec, tx, objective, 0.0, 1, shardings, mesh)
  _, metrics = step(state, sharding.global_batch(batch, mesh))
  assert float(metrics["tokens"]) == num_masked
  np.testing.assert_allclose(float(metrics["loss"]), float(np.sum(terms.nll_sum_B)) / num_masked,
                             rtol=1e-5)

  eval_step = make_eval_step(spec.merge, measures.get("maria"), objective.setup, 3, mesh)
  eval_key = jax.random.key(5)
  nll_B, count_B = eval_step(spec.initial_params, batch, eval_key)
  draw_fn = nnx.jit(lambda h, b, k: measures.maria_terms(h, b, k, objective.setup))
  draws = [draw_fn(head, batch, jax.random.fold_in(eval_key, i)) for i in range(3)]
  counts = [float(np.sum(d.num_tokens_B)) for d in draws]
  assert len(set(counts)) > 1  # the denominator differs between draws
  pooled = sum(float(np.sum(d.nll_sum_B)) for d in draws) / sum(counts)
  np.testing.assert_allclose(float(np.sum(nll_B)) / float(np.sum(count_B)), pooled, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(count_B) * 3,
                             np.sum([np.asarray(d.num_tokens_B) for d in draws], 0), rtol=1e-6)


def test_backbone_gradients_are_zero(head):
  """Even a trainer that differentiates every parameter leaves the backbones' gradients at 0."""
  @nnx.jit
  def grad_all(head, tokens):
    return nnx.grad(lambda h: maria_objective.maria_loss(
        h, {"tokens": tokens}, jax.random.key(0), schedule=schedules.get("loglinear"),
        ratio=0.5).nll_sum_B.sum())(head)

  grads = grad_all(head, _tokens(9))
  for leaf in jax.tree.leaves(nnx.state(grads, nnx.Not(hybrid.TRAINABLE))):
    assert not np.any(np.asarray(leaf))
  assert np.any(np.asarray(grads.w[...]))


def test_infill_keeps_given_tokens_and_fills_every_mask(head):
  x0 = _tokens(10, (4, L))
  xt = _masked(x0, 11, 0.6).at[1].set(x0[1]).at[2, 0].set(V)  # row 1: nothing to fill
  for kwargs in ({"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.9, "refresh_every": 2}):
    # (temperature, top_p, refresh_every are traced: one compilation serves both)
    out, stats = maria_infill(jax.random.key(0), head, xt, mask_id=V, **kwargs)
    out, xt_np = np.asarray(out), np.asarray(xt)
    given = xt_np != V
    np.testing.assert_array_equal(out[given], xt_np[given])
    assert ((out >= 0) & (out < V)).all()
    assert stats["num_filled"] == (~given).sum()
  # Padding is never filled and never changed.
  pad = np.ones((4, L), bool)
  pad[:, -3:] = False
  out, stats = maria_infill(jax.random.key(1), head, xt, mask_id=V, token_mask_BxL=pad)
  np.testing.assert_array_equal(np.asarray(out)[:, -3:], np.asarray(xt)[:, -3:])
  assert stats["num_filled"] == (np.asarray(xt)[:, :-3] == V).sum()


def _reference_infill(head, xt, refresh_every=0):
  """Greedy MARIA infilling without any cache: both models recomputed from scratch for every
  position. Refresh rule: after every k-th position at which some row fills a token, unless no
  mask is left after it."""
  x = np.array(xt)
  src = np.array(xt)  # what the denoiser reads
  positions = np.flatnonzero((xt == V).any(0))
  for n, i in enumerate(positions, start=1):
    fill = xt[:, i] == V
    logits = _forward(head, jnp.asarray(np.where(x == V, 0, x)), jnp.asarray(src))
    x[fill, i] = np.asarray(jnp.argmax(logits[:, i], -1))[fill]
    if refresh_every and n % refresh_every == 0 and i < positions[-1]:
      src = x.copy()
  return x


@pytest.mark.parametrize("refresh_every", [0, 2])
def test_greedy_cached_infill_equals_uncached_reference(head, refresh_every):
  x0 = _tokens(12)
  xt = np.array(_masked(x0, 13, 0.5))
  xt[0, 0] = V  # the first position masked too: no AR state there
  xt[1, :3] = x0[1, :3]
  out, stats = maria_infill(jax.random.key(0), head, jnp.asarray(xt), mask_id=V,
                                   temperature=0.0, refresh_every=refresh_every)
  np.testing.assert_array_equal(np.asarray(out), _reference_infill(head, xt, refresh_every))
  if refresh_every == 0:
    assert stats["denoiser_passes"] == 1
  single, stats = maria_infill(jax.random.key(0), head, jnp.asarray(xt[:1]), mask_id=V,
                                      temperature=0.0, refresh_every=2)
  n = int((xt[0] == V).sum())
  assert stats["denoiser_passes"] == 1 + (n - 1) // 2  # batch 1: a refresh every 2 fills


def test_maria_refuses_mismatched_backbones():
  with pytest.raises(ValueError, match="tokenizer"):
    hybrid.build_maria(_abstract("denoiser"), _abstract("ar", vocab_size=V + 1))
  with pytest.raises(ValueError, match="kind"):
    hybrid.build_maria(_abstract("ar"), _abstract("ar"))


@pytest.mark.slow
def test_train_cli_maria_from_two_runs(tmp_path):
  """End to end: train a tiny denoiser and a tiny AR model, then `objective=maria` over them;
  the MARIA run's checkpoint holds the source backbones bit for bit and a trained W."""
  from mdlm import train
  from tests.helpers import read_metrics, tiny_config
  den, arm, maria = (str(tmp_path / n) for n in ("den", "ar", "maria"))
  train.run(tiny_config(steps=2, eval_every=2), den)
  cfg = tiny_config(steps=2, eval_every=2)
  cfg.model = cfg.model.replace(kind="ar")
  train.run(cfg, arm)
  from mdlm.objectives.maria import MariaConfig
  from mdlm.rundir import load_run
  cfg = tiny_config(steps=6, eval_every=6, objective=MariaConfig(denoiser_run=den, ar_run=arm))
  cfg.optim.ema = 0.9
  train.run(cfg, maria)
  evals = [m for m in read_metrics(maria) if "val/nll" in m]
  assert evals and np.isfinite(evals[-1]["val/nll"])
  source = hybrid.build_maria(load_run(den).model, load_run(arm).model)
  for use_ema in (False, True):
    trained = load_run(maria, ema=use_ema).model
    a = jax.tree.leaves(nnx.state(trained, nnx.Not(hybrid.TRAINABLE)))
    b = jax.tree.leaves(nnx.state(source, nnx.Not(hybrid.TRAINABLE)))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(trained.w[...]), np.asarray(source.w[...]))


def test_meap_objective_registered(ar_model):
  from mdlm import objectives
  from mdlm.objectives.meap import MEAPConfig
  setup = objectives.Setup(schedule=schedules.get("loglinear"), mask_id=V, bos_id=1)
  objective = objectives.build(MEAPConfig(ratio=0.25), setup)
  tokens = np.array(_tokens(15), np.int32)
  tokens[:, 0] = 1
  batch = {"tokens": tokens, "token_mask": np.ones((4, L), bool)}
  batch.update(objective.draw(batch, jax.random.key(0), 0, None))
  terms, _ = nnx.jit(lambda m, b: objective.loss(m, b, None))(ar_model, batch)
  np.testing.assert_array_equal(terms.num_tokens_B, [L - 1] * 4)
  np.testing.assert_array_equal(terms.num_masked_B, [3] * 4)  # round(0.25 * (L - 2) = 2.5) = 3
  assert objective.causal and type(objective).measures == ("ar",)
  assert "maria" in objectives.names()


class _CharTokenizer:
  """A stand-in tokenizer over V ids: BOS 1, EOS 2, characters 3 + (ord % 30)."""

  vocab_size, bos_id, eos_id, pad_id = V, 1, 2, 0

  def encode(self, text):
    return [3 + ord(c) % 30 for c in text]

  def decode(self, ids):
    return "".join(chr(97 + (i - 3) % 26) for i in ids if 3 <= i < V)


def test_maria_plugs_into_the_infill_front_end(head):
  from mdlm import sampling
  # 10 template tokens + 2 appended masks = L: the compiled batch shape of the other tests.
  results, stats = sampling.infill(jax.random.key(0), head, _CharTokenizer(), "ab[MASK*3]cd[MASK]e",
                                   mask_id=V, num_samples=4, length=L, sampler="maria",
                                   temperature=1.0, refresh_every=2)
  assert stats["num_filled"] == 4 * 6 and stats["denoiser_passes"] >= 1
  given = [1] + _CharTokenizer().encode("ab")
  for r in results:
    assert r["tokens"][:3] == given and len(r["fills"]) == 3
    assert r["tokens"][6:8] == _CharTokenizer().encode("cd") and V not in r["tokens"]


# ---------------------------------------------------------------- the sampling CLI (sampler=maria)


def _sample_cfg(run, tmp_path, name="maria", **kw):
  from mdlm.sampling import config as sample_config
  sampler = sample_config.SamplerConfig(name=name, **kw.pop("sampler", {}))
  output = tmp_path / f"{name}-{len(list(tmp_path.glob('*.jsonl')))}.jsonl"  # a new file each
  return sample_config.SampleConfig(run=run, sampler=sampler, num_samples=3, batch_size=2,
                                    output=str(output), print_samples=False, progress=False, **kw)


def test_sample_cli_maria_fills_templates_prompts_and_blanks(tiny_maria_run, tmp_path):
  """`mdlm.sample.run` with sampler=maria on a trained MARIA run: given tokens unchanged, every
  mask filled, one JSON line per sample. (length=32 everywhere: one compilation.)"""
  import json
  from mdlm import sample
  from mdlm.sampling import text
  template = "To be, or [MASK*4] to be: [MASK*3] is"
  cfg = _sample_cfg(tiny_maria_run, tmp_path, template=template, length=32,
                    sampler={"temperature": 0.8, "top_p": 0.9, "refresh_every": 2})
  summary = sample.run(cfg)
  from mdlm.rundir import load_run
  tokenizer = load_run(tiny_maria_run).tokenizer
  mask_id = tokenizer.vocab_size
  parsed = text.parse_template(template, tokenizer, mask_id, length=32)
  given = parsed.tokens != mask_id
  lines = [json.loads(l) for l in open(summary["output"])]
  assert len(lines) == 3 and [l["index"] for l in lines] == [0, 1, 2]
  for line in lines:
    tokens = np.asarray(line["tokens"])
    assert line["sampler"] == "maria" and line["nfe"] >= 1
    np.testing.assert_array_equal(tokens[given], parsed.tokens[given])  # given tokens unchanged
    assert ((tokens >= 0) & (tokens < mask_id)).all()  # every mask filled, no mask id left
    assert len(line["fills"]) == len(parsed.spans)
  assert summary["sampler"]["name"] == "maria" and summary["sampler"]["refresh_every"] == 2
  assert summary["nfe_per_batch"] > 1  # refresh_every=2 refreshed the denoiser states

  prompt = "To be, or not"
  out = sample.run(_sample_cfg(tiny_maria_run, tmp_path, prompt=prompt, length=32,
                               sampler={"temperature": 0.0}))
  start = text.prompt_tokens(tokenizer, prompt, 32, mask_id)
  for item in out["samples"]:
    tokens = np.asarray(item["tokens"])
    np.testing.assert_array_equal(tokens[start != mask_id], start[start != mask_id])
    assert (tokens < mask_id).all()
  blank = sample.run(_sample_cfg(tiny_maria_run, tmp_path, length=32))  # unconditional
  assert all((np.asarray(i["tokens"]) < mask_id).all() for i in blank["samples"])


def test_sample_cli_maria_refusals(tiny_run, tiny_maria_run, tmp_path):
  from mdlm import sample
  with pytest.raises(ValueError, match="sampler=maria needs a MARIA run"):
    sample.run(_sample_cfg(tiny_run, tmp_path))
  with pytest.raises(ValueError, match="is a MARIA run .*sampler=maria"):
    sample.run(_sample_cfg(tiny_maria_run, tmp_path, name="ancestral"))
  with pytest.raises(ValueError, match="guidance is not supported with sampler=maria"):
    sample.run(_sample_cfg(tiny_maria_run, tmp_path, template="a [MASK] b",
                           sampler={"guidance": 1.0}))
  with pytest.raises(ValueError, match="refresh_every=-1 must be >= 0"):
    sample.run(_sample_cfg(tiny_maria_run, tmp_path, sampler={"refresh_every": -1}))
  with pytest.raises(ValueError, match="exceeds the MARIA backbones' max_seq_len"):
    sample.run(_sample_cfg(tiny_maria_run, tmp_path, length=10_000))


def test_sampler_maria_preset_loads():
  from omegaconf import OmegaConf
  from mdlm.sampling import config as sample_config
  preset = OmegaConf.load(f"{__file__.rsplit('/tests/', 1)[0]}/configs/sampler/maria.yaml")
  merged = OmegaConf.merge(OmegaConf.structured(sample_config.SamplerConfig),
                           {k: v for k, v in preset.items() if k != "defaults"})
  s = OmegaConf.to_object(merged)
  assert s.name == "maria" and s.refresh_every == 0
  assert s.settings(None, 7) == {"mask_id": 7, "temperature": 1.0, "top_p": 1.0,
                                 "refresh_every": 0}
