"""ExLM (mdlm.models.exlm, mdlm.objectives.exlm): the expanded layout, the DAG's dynamic programs
against brute-force enumeration of every path, the reduction to plain MLM at k = 1, log-space
stability at long lengths, the 2D rotary positions, the readout the measures and samplers call,
learning under jit, the refusals; and (slow) a run through the trainer and the evaluator."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from mdlm import config as config_lib
from mdlm import diffusion, evaluate, masking, measures, models, objectives, rundir, train
from mdlm.models import exlm, presets
from mdlm.models.transformer import rotary_2d
from mdlm.objectives import exlm as exlm_objective
from tests.helpers import REPO, tiny_config, train_losses

NEG = exlm.NEG


def _build(seed=0, **changes):
  """A tiny ExLM with random parameters drawn by numpy (JAX's initialisers would compile a
  program per parameter shape; these tests need a model, not a trained or well-scaled one)."""
  cfg = presets.get("tiny", num_layers=1, d_model=32, max_seq_len=16, **changes)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(cfg)))
  rng = np.random.default_rng(seed)
  values = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.3).astype(x.dtype),
                        nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _allowed(u, v, k, count, links):
  """The test's own statement of the DAG: vertex u is state u % k of the (u // k)-th [MASK]."""
  if u // k >= count or v // k >= count:
    return False
  return v > u if links == "dense" else v // k == u // k + 1


def _brute_paths(count, n, k, links):
  """Every vertex sequence of length `count` from the first [MASK]'s states to the last's."""
  for path in itertools.product(range(n), repeat=count):
    if path[0] // k == 0 and path[-1] // k == count - 1 and all(
        _allowed(a, b, k, count, links) for a, b in zip(path, path[1:])):
      yield path


def _random_dag(rng, k, cap, counts, links):
  """Random log emissions [B, M, N], links [B, N, N] and starts [B, N], with the test's own
  masking (disallowed entries NEG), and float64 copies for the brute force."""
  n = k * cap
  b = len(counts)
  emit = rng.normal(size=(b, cap, n)) * 2 - 3
  link = rng.normal(size=(b, n, n))
  start = rng.normal(size=(b, n))
  ok = np.array([[[_allowed(u, v, k, c, links) for v in range(n)] for u in range(n)]
                 for c in counts])
  first = np.array([[u // k == 0 and c > 0 for u in range(n)] for c in counts])
  end = np.array([[u // k == c - 1 for u in range(n)] for c in counts])
  link_m = np.where(ok, link, NEG)
  start_m = np.where(first, start, NEG)
  return emit, link, start, (emit.astype(np.float32), link_m.astype(np.float32),
                             start_m.astype(np.float32), end)


@pytest.mark.parametrize("links", ["dense", "adjacent"])
def test_dag_log_likelihood_equals_brute_force(links):
  k, cap, counts = 2, 3, [3, 2, 1, 0]
  rng = np.random.default_rng(0)
  emit, link, start, jax_args = _random_dag(rng, k, cap, counts, links)
  got = np.asarray(exlm.dag_log_likelihood(*jax_args, jnp.asarray(counts)))
  for b, c in enumerate(counts):
    if c == 0:  # no [MASK]: nothing to score
      assert got[b] == 0.0
      continue
    terms = [start[b, p[0]] + sum(link[b, x, y] for x, y in zip(p, p[1:]))
             + sum(emit[b, j, u] for j, u in enumerate(p)) for p in _brute_paths(c, k * cap, k,
                                                                                links)]
    assert got[b] == pytest.approx(float(np.logaddexp.reduce(terms)), abs=1e-4), (b, c)
  # The masks the model builds are the test's own DAG.
  allowed, first, end = exlm.vertex_masks(jnp.asarray(counts), k, cap, links)
  np.testing.assert_array_equal(np.where(allowed, 0.0, NEG), np.where(jax_args[1] > NEG, 0., NEG))
  np.testing.assert_array_equal(first, jax_args[2] > NEG)
  np.testing.assert_array_equal(end, jax_args[3])


@pytest.mark.parametrize("links", ["dense", "adjacent"])
def test_state_marginals_equal_brute_force(links):
  """P(a_j = u | a valid path) of the transitions alone, by enumeration."""
  k, cap, counts = 2, 3, [3, 2]
  rng = np.random.default_rng(1)
  _, link, start, (_, link_m, start_m, end) = _random_dag(rng, k, cap, counts, links)
  log_q = np.asarray(exlm.dag_state_marginals(link_m, start_m, end, jnp.asarray(counts), cap))
  for b, c in enumerate(counts):
    weight = np.zeros((c, k * cap))
    for p in _brute_paths(c, k * cap, k, links):
      w = math.exp(start[b, p[0]] + sum(link[b, x, y] for x, y in zip(p, p[1:])))
      for j, u in enumerate(p):
        weight[j, u] += w
    np.testing.assert_allclose(np.exp(log_q[b, :c]), weight / weight[0].sum(), atol=1e-5)


def test_k1_identity_path_is_plain_mlm_cross_entropy():
  """k = 1: the only path is the identity (one state per [MASK]); fixing dense links to it, or
  using adjacent links (where it is the only allowed one), the loss is the sum of MLM CEs."""
  rng = np.random.default_rng(2)
  emit = np.log(rng.dirichlet(np.ones(5), size=(2, 4))).astype(np.float32)  # [B, M, N=M]
  counts = jnp.asarray([4, 3])
  identity = np.where(np.arange(4)[None, :] == np.arange(4)[:, None] + 1, 0.0, NEG)
  start = np.where(np.arange(4) == 0, 0.0, NEG)
  end = np.arange(4)[None, :] == (np.asarray(counts)[:, None] - 1)
  got = exlm.dag_log_likelihood(emit[..., :4], np.broadcast_to(identity, (2, 4, 4)),
                                np.broadcast_to(start, (2, 4)), end, counts)
  want = [np.trace(emit[0, :, :4]), np.trace(emit[1, :3, :3])]
  np.testing.assert_allclose(got, want, rtol=1e-6)

  # The whole model, adjacent links, k = 1, against the backbone's own MLM cross-entropy.
  model = _build(exlm_states=1, exlm_links="adjacent", vocab_size=13)
  x0 = rng.integers(0, 13, (3, 10))
  token_mask = np.ones((3, 10), bool)
  token_mask[2, 7:] = False
  scored = np.zeros((3, 10), bool)
  scored[0, [1, 4, 8]] = scored[1, [0, 2, 9]] = scored[2, [3, 5]] = True

  @jax.jit
  def both(x0, scored):
    ll_B, count_B = exlm_objective.joint_log_likelihood(model, x0, scored, 3,
                                                        token_mask_BxL=token_mask)
    xt = jnp.where(scored, 13, x0)
    positions = jnp.stack([jnp.broadcast_to(jnp.arange(10), (3, 10)), scored.astype(int)], -1)
    hidden = model.backbone.hidden_states(xt, token_mask_BxL=token_mask, positions=positions)
    ce = diffusion.masked_cross_entropy(model.backbone.logits(hidden), x0, 13)
    return -ll_B, jnp.sum(jnp.where(scored, ce, 0.0), 1), count_B

  nll_B, mlm_B, count_B = both(x0, scored)
  np.testing.assert_allclose(nll_B, mlm_B, rtol=2e-5)
  np.testing.assert_array_equal(count_B, [3, 3, 2])


def test_long_sequences_stay_finite_in_log_space():
  """320 vertices, 160 targets: P(Y) ~ e^-1500 underflows any float, but the log-space program
  matches an independent float64 recursion and its gradients are finite."""
  k, cap, b, v = 2, 160, 2, 50
  n = k * cap
  counts = jnp.asarray([160, 120])
  logits = jax.random.normal(jax.random.key(0), (b, n, v)) * 4
  targets = jax.random.randint(jax.random.key(1), (b, cap), 0, v)
  link_raw = jax.random.normal(jax.random.key(2), (b, n, n))
  allowed, first, end = exlm.vertex_masks(counts, k, cap, "dense")

  def log_likelihood(logits, link_raw):
    emit = exlm_objective.emissions(logits, targets)
    links = jnp.where(allowed, jax.nn.log_softmax(jnp.where(allowed, link_raw, NEG), -1), NEG)
    start = jnp.where(first, 0.0, NEG)
    return exlm.dag_log_likelihood(emit, links, start, end, counts)

  ll = np.asarray(jax.jit(log_likelihood)(logits, link_raw))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(log_likelihood(*a)), argnums=(0, 1)))(logits,
                                                                                      link_raw)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  emit64 = np.asarray(exlm_objective.emissions(logits, targets), np.float64)
  links64 = np.asarray(jnp.where(allowed, jax.nn.log_softmax(jnp.where(allowed, link_raw, NEG),
                                                             -1), -np.inf), np.float64)
  for row in range(b):
    f = np.where(np.asarray(first[row]), emit64[row, 0], -np.inf)
    for j in range(1, int(counts[row])):
      f = emit64[row, j] + np.logaddexp.reduce(f[:, None] + links64[row], axis=0)
    want = np.logaddexp.reduce(f[np.asarray(end[row])])
    assert want < -500 and ll[row] == pytest.approx(want, rel=1e-4)


def test_layout_and_2d_rotary():
  tokens = np.asarray([[5, 9, 6, 9, 7]])
  scored = tokens == 9
  layout = jax.jit(lambda t, s: exlm.expand_layout(t, s, None, 3, 2))
  lay = layout(tokens, scored)
  np.testing.assert_array_equal(lay.tokens_BxT, [[5, 9, 9, 9, 6, 9, 9, 9, 7]])
  np.testing.assert_array_equal(lay.positions_BxTx2[0, :, 0], [0, 1, 1, 1, 2, 3, 3, 3, 4])
  np.testing.assert_array_equal(lay.positions_BxTx2[0, :, 1], [0, 1, 2, 3, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(lay.vertex_slot_BxN, [[1, 2, 3, 5, 6, 7]])
  np.testing.assert_array_equal(lay.first_slot_BxL, [[0, 1, 4, 5, 8]])
  short = layout(tokens, tokens == 9 * np.asarray([1, 1, 1, 0, 1]))  # one [MASK]
  np.testing.assert_array_equal(short.key_mask_BxT, [[1] * 7 + [0] * 2])
  # q . k after the 2D rotary depends on (p - p', s - s') only, and on s.
  q = np.random.default_rng(0).normal(size=(1, 4, 2, 8)).astype(np.float32)
  pos = np.asarray([[[0, 0], [3, 1], [3, 2], [7, 0]]])
  dots = jax.jit(lambda p: jnp.einsum("blnh,bmnh->bnlm", *(2 * [rotary_2d(q, p, 100.0)])))
  np.testing.assert_allclose(dots(pos), dots(pos + np.asarray([11, 5])), atol=1e-4)
  other = pos.copy()
  other[0, 1, 1] = 3
  assert not np.allclose(dots(pos), dots(other), atol=1e-3)


def test_readout_is_normalised_and_independent_of_the_cap():
  """The denoiser readout at [MASK]s is a distribution, the same whatever static cap it runs
  at; the `masked` measure reaches it through lax.switch."""
  model = _build(exlm_states=3, vocab_size=11)
  token_mask = np.ones((3, 8), bool)
  token_mask[1, 5:] = False
  batch = {"tokens": np.random.default_rng(0).integers(0, 11, (3, 8)), "token_mask": token_mask}
  setup = objectives.make_setup(config_lib.Config(), 11)
  key = jax.random.key(3)

  @jax.jit
  def run(batch):
    # round(0.25 x real) = 2, 1, 2 [MASK]s: masked_terms runs the cap-2 branch of (2, 4, 8).
    terms = measures.masked_terms(model, batch, key, setup, ratio=0.25)
    count_B = masking.mask_count(jnp.sum(batch["token_mask"], 1), 0.25)
    scored = masking.choose_uniform(key, batch["token_mask"], count_B)
    full = model.readout(jnp.where(scored, 11, batch["tokens"]), cap=8,
                         token_mask_BxL=batch["token_mask"])
    ce = diffusion.masked_cross_entropy(full, batch["tokens"], 11)
    return terms, jnp.sum(jnp.where(scored, ce, 0.0), 1), full, scored

  terms, full_cap_B, full, scored = run(batch)
  np.testing.assert_allclose(jax.nn.logsumexp(full, -1)[scored], 0.0, atol=1e-5)
  np.testing.assert_allclose(terms.nll_sum_B, full_cap_B, rtol=1e-5)  # cap 2 == cap 8
  np.testing.assert_array_equal(terms.num_tokens_B, [2, 1, 2])
  with pytest.raises(ValueError, match="bidirectional"):
    model(batch["tokens"], causal=True)


def _exlm_config(**changes):
  cfg = tiny_config(steps=40, objective="exlm")
  cfg.model = cfg.model.replace(exlm_states=2, num_layers=1)
  cfg.masking = config_lib.MaskingConfig(ratio="fixed", p=0.25, weighting="sum_masked")
  for key, value in changes.items():
    section, name = key.split("__")
    if section == "model":
      cfg.model = cfg.model.replace(**{name: value})
    else:
      setattr(getattr(cfg, section), name, value)
  return cfg


def test_objective_learns_a_batch():
  """The objective's draw, loss and denominator under jit: Adam on one fixed batch drives the
  loss down (the trainer's own path is the slow test below)."""
  model = _build(exlm_states=2, vocab_size=11)
  setup = objectives.make_setup(_exlm_config(), 11)
  objective = objectives.build(_exlm_config().objective, setup)
  # Each row repeats one token: every [MASK] is predictable from any visible token.
  batch = {"tokens": np.repeat(np.asarray([[1], [4], [7], [9]]), 16, axis=1),
           "token_mask": np.ones((4, 16), bool)}
  graphdef, state = nnx.split(model)
  tx = optax.adam(3e-2)

  def loss_fn(params, key):
    copy = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(copy, params)
    m = nnx.merge(graphdef, copy)
    drawn = dict(batch, **objective.draw(batch, key, 0, None))
    terms, _ = objective.loss(m, drawn, key)
    return jnp.sum(terms.nll_sum_B) / objective.denominator(drawn)

  @jax.jit
  def step(params, opt_state, i):
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(jax.random.key(0), i))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = nnx.to_pure_dict(state)
  opt_state = tx.init(params)
  losses = []
  for i in range(15):
    params, opt_state, loss = step(params, opt_state, i)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


@pytest.mark.slow
def test_trains_through_the_trainer_and_evaluates(tmp_path):
  run_dir = str(tmp_path / "run")
  train.run(_exlm_config(), run_dir)
  losses = train_losses(run_dir)
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in
                                                                    range(36, 41)])
  assert last < first - 0.5, (first, last)
  assert isinstance(rundir.load_run(run_dir).model, exlm.ExLM)
  result = evaluate.evaluate_run(evaluate.EvalConfig(
      run=run_dir, max_batches=1, time_samples=1, progress=False,
      output=str(tmp_path / "eval.json")))
  assert result["measure"] == "exlm15" and 0 < result["nll"] < first
  with pytest.raises(ValueError, match="do not apply"):
    evaluate.evaluate_run(evaluate.EvalConfig(run=run_dir, measures=["ar"], progress=False))


@pytest.mark.parametrize("changes, message", [
    (dict(model__exlm_states=0), "needs k >= 1"),
    (dict(model__exlm_states=-1), "exlm_states must be >= 1"),
    (dict(model__kind="ar"), "bidirectional"),
    (dict(masking__ratio="schedule"), "masking.ratio=fixed"),
    (dict(masking__corruption="bert"), "corruption=mask"),
    (dict(masking__content="weighted"), "content=random"),
    (dict(masking__p=0.01), "0 tokens"),
    (dict(model__d_model=40), "head_dim % 4"),
    (dict(model__exlm_links="sparse"), "exlm_links"),
])
def test_bad_settings_are_refused_before_compiling(changes, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_exlm_config(**changes))


def test_expanded_model_needs_the_exlm_objective():
  cfg = _exlm_config()
  cfg.objective = config_lib.objective_configs()["diffusion"]()
  with pytest.raises(ValueError, match="objective=exlm"):
    config_lib.validate(cfg)
  cfg = _exlm_config(model__kind="ar", model__exlm_states=0)
  with pytest.raises(ValueError, match="bidirectional denoiser"):
    config_lib.validate(cfg)


def test_the_preset_and_what_an_exlm_run_is_scored_with():
  """experiment=exlm: k = 4 (the released code's default), dense links, mlm15's masking; its
  runs are scored with the bidirectional measures, never the next-token NLL."""
  config_lib.register_configs()
  with initialize_config_dir(config_dir=f"{REPO}/configs", version_base=None):
    cfg = config_lib.to_config(compose("config", overrides=["experiment=exlm"]))
  assert (cfg.objective.name, cfg.model.exlm_states, cfg.model.exlm_links) == ("exlm", 4, "dense")
  assert (cfg.masking.ratio, cfg.masking.p, cfg.masking.weighting) == ("fixed", 0.15, "sum_masked")
  applicable = evaluate.applicable_measures(cfg)
  assert applicable[:3] == ["exlm15", "exlm40", "exlm80"] and "masked80" in applicable
  assert "ar" not in applicable
