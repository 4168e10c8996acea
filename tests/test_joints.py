"""mdlm.joints: two-token joints derived from a masked model's conditionals (Torroba Hennigen and
Kim 2023), checked against known joints, an independent numpy computation, per-value forward
passes of a tiny transformer, brute-force AR likelihoods, and the refusals of bad input."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from flax import nnx

from mdlm import joints, models
from mdlm.config import ModelConfig
from mdlm.data import ByteTokenizer, CharTokenizer
from mdlm.rundir import RunDir
from tests.helpers import tiny_config

V = 5


# ----------------------------------------------------------------------------- a known joint


class Oracle(nnx.Module):
  """A 'denoiser' over L positions whose predictions are the exact conditionals of a known joint
  P(x_0, ..., x_{L-1}): at each position, P(x_p | the unmasked positions), in log space."""

  def __init__(self, log_joint):
    vocab, length = log_joint.shape[0], log_joint.ndim
    self.cfg = ModelConfig(kind="denoiser", vocab_size=vocab, max_seq_len=length)
    configs = np.asarray(list(itertools.product(range(vocab), repeat=length)), np.int32)
    self.configs = nnx.Variable(jnp.asarray(configs))
    self.log_p = nnx.Variable(jnp.asarray(log_joint.reshape(-1), jnp.float32))

  def hidden_states(self, tokens_NxL, noise=None, *, token_mask_BxL=None, causal=False):
    configs, vocab = self.configs[...], self.cfg.vocab_size
    agree = jnp.all((tokens_NxL[:, None, :] == vocab) | (configs[None] == tokens_NxL[:, None, :]),
                    axis=-1)
    weight = jnp.where(agree, self.log_p[...][None], -jnp.inf)  # [N, K]
    hit = configs[:, :, None] == jnp.arange(vocab)  # [K, L, V]
    out = jax.nn.logsumexp(jnp.where(hit[None], weight[:, :, None, None], -jnp.inf), axis=1)
    return out - jax.nn.logsumexp(out, axis=-1, keepdims=True)

  def logits(self, hidden):
    return hidden


def _random_joint(seed, length=4, independent_pair=False):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(V ** length, 0.7)).reshape((V,) * length)
  if independent_pair:  # x_0 and x_1 independent given the rest
    rest = p.sum(axis=(0, 1))
    p_0, p_1 = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    p = p_0[:, None, None, None] * p_1[None, :, None, None] * rest[None, None]
  return np.log(p)


def _truth(log_joint, i, j, tokens):
  """log P(x_i, x_j | the other positions of tokens), [V, V] in numpy."""
  index = [slice(None) if p in (i, j) else tokens[p] for p in range(log_joint.ndim)]
  table = log_joint[tuple(index)]
  table = table if i < j else table.T
  return table - np.log(np.exp(table).sum())


@jax.jit
def _derived(tables):
  """Every construction's joint, HCB at every pivot and AG's figures: one compiled program (the
  tests compile little: compiling is most of their time)."""
  log_i, log_j = tables.log_cond_i(), tables.log_cond_j()
  every_pivot = jax.vmap(lambda p: joints.hcb_joint(log_i, log_j, jnp.full(log_i.shape[:1], p)))(
      jnp.arange(log_i.shape[1]))
  derived = tables.joints()
  return {"joints": derived, "hcb_every_pivot": every_pivot, "marg_i": tables.log_marg_i(),
          "ag": joints.pair_metrics(derived["ag"], log_i, log_j, tables.true_i, tables.true_j)}


@pytest.mark.parametrize("i,j", [(1, 3), (3, 0)])
def test_hcb_and_ag_recover_a_known_joint_and_mrf_is_biased(i, j):
  log_joint = _random_joint(0)
  oracle = Oracle(log_joint)
  tokens = np.asarray([[2, 4, 1, 3]])
  out = _derived(joints.pair_tables(oracle, tokens, [i], [j]))
  derived = {k: np.asarray(v[0]) for k, v in out["joints"].items()}
  truth = _truth(log_joint, i, j, tokens[0])
  np.testing.assert_allclose(derived["hcb"], truth, atol=2e-5)
  np.testing.assert_allclose(derived["ag"], truth, atol=2e-5)
  for pivot in range(V):  # consistent conditionals: HCB is the same for every pivot
    np.testing.assert_allclose(np.asarray(out["hcb_every_pivot"][pivot, 0]), truth, atol=2e-5)
  p = np.exp(truth)  # the MRF of exact conditionals is P^2 / (P_i P_j), not P
  mrf = p ** 2 / (p.sum(1, keepdims=True) * p.sum(0, keepdims=True))
  np.testing.assert_allclose(np.exp(derived["mrf"]), mrf / mrf.sum(), atol=2e-6)
  assert np.abs(np.exp(derived["mrf"]) - p).max() > 1e-2
  # the unary joint: the exact doubly masked marginals, multiplied
  np.testing.assert_allclose(np.exp(np.asarray(out["marg_i"][0])), p.sum(1), atol=2e-6)
  np.testing.assert_allclose(np.exp(derived["unary"]), np.outer(p.sum(1), p.sum(0)), atol=2e-6)
  assert abs(float(out["ag"]["kl_all"][0])) < 1e-5 and abs(float(out["ag"]["kl_true"][0])) < 1e-5


def test_every_construction_recovers_an_independent_pair():
  log_joint = _random_joint(1, independent_pair=True)
  tokens = np.asarray([[0, 3, 2, 2]])
  out = _derived(joints.pair_tables(Oracle(log_joint), tokens, [0], [1]))
  truth = _truth(log_joint, 0, 1, tokens[0])
  for name, log_p in out["joints"].items():
    np.testing.assert_allclose(np.asarray(log_p[0]), truth, atol=3e-5, err_msg=name)


def test_top_k_of_a_known_joint_is_the_joint_restricted_to_the_support():
  log_joint = _random_joint(2)
  tokens = np.asarray([[1, 0, 4, 2], [3, 3, 0, 1]])
  tables = joints.pair_tables(Oracle(log_joint), tokens, [0, 2], [2, 3], top_k=3)
  derived = _derived(tables)["joints"]
  for b, (i, j) in enumerate([(0, 2), (2, 3)]):
    s_i, s_j = np.asarray(tables.support_i[b]), np.asarray(tables.support_j[b])
    assert s_i[0] == tokens[b, i] and s_j[0] == tokens[b, j] and len(set(s_i)) == 3
    full = np.exp(_truth(log_joint, i, j, tokens[b]))
    # forced: outside the slate the model would pick alone (double argmax, best single, next double)
    for pos, (p, single) in enumerate(((full.sum(1), full[:, tokens[b, j]]),
                                       (full.sum(0), full[tokens[b, i]]))):
      first = int(np.argmax(p))
      second = max((v for v in range(V) if v != first), key=lambda v: single[v])
      third = max((v for v in range(V) if v not in (first, second)), key=lambda v: p[v])
      x = tokens[b, (i, j)[pos]]
      assert bool(tables.forced[b, pos]) == (x not in (first, second, third))
    truth = np.log(full[np.ix_(s_i, s_j)] / full[np.ix_(s_i, s_j)].sum())
    for name in ("hcb", "ag"):
      np.testing.assert_allclose(np.asarray(derived[name][b]), truth, atol=2e-5, err_msg=name)
  # HCB alone, from the table of x_i and one row of x_j's (at the pivot): the same joint
  alone = joints.construction_joint(Oracle(log_joint), tokens, [0, 2], [2, 3], "hcb", top_k=3)
  np.testing.assert_array_equal(np.asarray(alone.support_j), np.asarray(tables.support_j))
  np.testing.assert_allclose(np.asarray(alone.log_joint), np.asarray(derived["hcb"]), atol=2e-5)


# ----------------------------------------------------------------------------- inconsistent tables

# q_{i|j}(a | b): column b is a distribution over a. q_{j|i}(b | a): row a is one over b.
COND_I = np.asarray([[0.7, 0.1, 0.3], [0.2, 0.6, 0.3], [0.1, 0.3, 0.4]])
COND_J = np.asarray([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])


def _np_kls(joint, cond_i, cond_j):
  """The paper's consistency, written out: forward KLs of every conditional, summed."""
  total = 0.0
  for b in range(joint.shape[1]):
    p = joint[:, b] / joint[:, b].sum()
    total += sum(q * np.log(q / r) for q, r in zip(cond_i[:, b], p))
  for a in range(joint.shape[0]):
    p = joint[a] / joint[a].sum()
    total += sum(q * np.log(q / r) for q, r in zip(cond_j[a], p))
  return total


def _np_closest_joint(cond_i, cond_j, starts=4):
  """argmin of _np_kls over joints (softmax parameters, BFGS from several random starts)."""
  rng = np.random.default_rng(0)
  shape = cond_i.shape

  def objective(theta):
    p = np.exp(theta - theta.max())
    return _np_kls((p / p.sum()).reshape(shape), cond_i, cond_j)

  best = min((scipy.optimize.minimize(objective, rng.normal(size=cond_i.size), method="BFGS",
                                      options={"gtol": 1e-10}) for _ in range(starts)),
             key=lambda r: r.fun)
  p = np.exp(best.x - best.x.max())
  return (p / p.sum()).reshape(shape), best.fun


@jax.jit
def _hand_built(log_i, log_j):
  """The constructions and figures of the hand-built tables, as one compiled program."""
  hcb = jax.vmap(lambda p: joints.hcb_joint(log_i, log_j, p[None])[0])(jnp.arange(3))
  mrf = joints.mrf_joint(log_i, log_j)[0]
  ag, steps = joints.ag_solve(log_i, log_j)
  at = (jnp.asarray([1]), jnp.asarray([2]))
  metrics = {name: joints.pair_metrics(j[None], log_i, log_j, *at)
             for name, j in (("mrf", mrf), ("ag", ag[0]), ("hcb0", hcb[0]))}
  path = jnp.stack([joints.ag_objective(joints.ag_joint(log_i, log_j, n, tol=0.0), log_i, log_j)[0]
                    for n in (1, 5, 20, 200)])
  return hcb, mrf, ag[0], steps[0], metrics, path


def _np_kl(q, p):
  return float(np.sum(q * np.log(q / p)))


def test_inconsistent_tables_hcb_depends_on_its_pivot_and_ag_is_closest():
  ratio = COND_I / COND_J  # consistent conditionals have a rank-one ratio; these do not
  assert np.linalg.matrix_rank(ratio, tol=1e-6) > 1
  hcb, mrf, ag, steps, metrics, path = jax.tree.map(
      np.asarray, _hand_built(jnp.log(COND_I)[None], jnp.log(COND_J)[None]))
  hcb, mrf, ag = np.exp(hcb), np.exp(mrf), np.exp(ag)
  for pivot, joint in enumerate(hcb):
    ref = COND_I * COND_J[pivot][None, :] / COND_I[pivot][None, :]
    np.testing.assert_allclose(joint, ref / ref.sum(), atol=1e-6)
  assert min(np.abs(hcb[a] - hcb[b]).max() for a, b in [(0, 1), (0, 2), (1, 2)]) > 1e-2
  np.testing.assert_allclose(mrf, COND_I * COND_J / (COND_I * COND_J).sum(), atol=1e-6)
  assert 5 < int(steps) < joints.AG_ITERATIONS  # it stopped because it converged
  closest, closest_kl = _np_closest_joint(COND_I, COND_J)
  np.testing.assert_allclose(ag, closest, atol=2e-4)
  kls = {"mrf": _np_kls(mrf, COND_I, COND_J), "ag": _np_kls(ag, COND_I, COND_J),
         **{f"hcb{p}": _np_kls(h, COND_I, COND_J) for p, h in enumerate(hcb)}}
  assert kls["ag"] == pytest.approx(closest_kl, abs=1e-6)
  assert all(kls["ag"] < v - 1e-3 for k, v in kls.items() if k != "ag"), kls
  # pair_metrics' KL (all) is that sum over the 6 conditioning values; at the truth (a, b) = (1, 2)
  for name, joint in [("mrf", mrf), ("ag", ag), ("hcb0", hcb[0])]:
    m = metrics[name]
    assert float(m["kl_all"][0]) == pytest.approx(kls[name] / 6, abs=1e-5)
    assert float(m["nll_pair"][0]) == pytest.approx(-np.log(joint[1, 2]), abs=1e-5)
    p_i, p_j = joint[:, 2] / joint[:, 2].sum(), joint[1] / joint[1].sum()
    assert float(m["nll_unary"][0]) == pytest.approx(-np.log(p_i[1] * p_j[2]), abs=1e-5)
    kl_true = 0.5 * (_np_kl(COND_I[:, 2], p_i) + _np_kl(COND_J[1], p_j))
    assert float(m["kl_true"][0]) == pytest.approx(kl_true, abs=1e-5)
  # AG's objective goes down along the iteration, to the numpy optimum
  assert all(a >= b - 1e-6 for a, b in zip(path, path[1:]))
  assert path[-1] == pytest.approx(closest_kl, abs=1e-6)


# ----------------------------------------------------------------------------- a tiny transformer


def _tiny(kind="denoiser", time_conditioning=False, seed=0, vocab=7):
  """A one-layer transformer with random weights (drawn in numpy: no initialiser to compile)."""
  cfg = ModelConfig(kind=kind, num_layers=1, d_model=32, num_heads=2, max_seq_len=16,
                    time_conditioning=time_conditioning, cond_dim=16)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(cfg, vocab_size=vocab)))
  rng = np.random.default_rng(seed)
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


@nnx.jit
def _forward(model, tokens_NxL, noise_N):
  """A plain forward pass of every row (compiled whole: cheaper than op by op)."""
  return model(tokens_NxL, noise_N)


def test_batched_tables_equal_one_forward_pass_per_value():
  # time-conditioned: the model must also be told 1/n tokens masked (one mask), 2/n (two)
  model = _tiny(time_conditioning=True)
  tokens = np.random.default_rng(0).integers(0, 7, (3, 12)).astype(np.int32)
  i_B, j_B = np.asarray([3, 11, 0]), np.asarray([4, 1, 6])
  tables = joints.pair_tables(model, tokens, i_B, j_B, chunk=3)  # 7 values: chunks 3 + 3 + 1
  rows, noise, expected = [], [], []
  for b in range(3):
    i, j = i_B[b], j_B[b]
    both = tokens[b].copy()
    both[[i, j]] = 7
    for value in (0, 2, 6):
      for write, read, got in ((j, i, tables.logit_i[b, :, value]),
                               (i, j, tables.logit_j[b, value, :])):
        x = both.copy()
        x[write] = value  # one of the pair set to `value`, the other masked and read
        rows.append(x), noise.append(1 / 12), expected.append((read, got))
    for read, got in ((i, tables.marg_logit_i[b]), (j, tables.marg_logit_j[b])):
      rows.append(both), noise.append(2 / 12), expected.append((read, got))
  logits = np.asarray(_forward(model, jnp.asarray(np.stack(rows)), jnp.asarray(noise)))
  for n, (read, got) in enumerate(expected):
    np.testing.assert_allclose(np.asarray(got), logits[n, read], atol=1e-4)


def test_top_k_equal_to_v_equals_the_exact_joints_and_pairs_of_a_kind_are_scored():
  model = _tiny(seed=1)
  windows = np.random.default_rng(1).integers(0, 7, (5, 12)).astype(np.int32)
  i_B, j_B = [1, 4, 10], [2, 9, 11]
  exact = joints.evaluate_pairs(model, windows[:3], i_B, j_B, chunk=3)
  top = joints.evaluate_pairs(model, windows[:3], i_B, j_B, top_k=7, chunk=3)
  for name in exact:
    for metric in exact[name]:  # AG's iteration count may differ by a step (float rounding)
      np.testing.assert_allclose(top[name][metric], exact[name][metric],
                                 atol=2.0 if metric == "iterations" else 2e-5,
                                 err_msg=f"{name} {metric}")
  # the CLI's scoring of a kind, on the same shapes (batches of 3 pairs): figures and the table
  jcfg = joints.JointsConfig(run="-", num_pairs=3, batch_size=3, chunk=3)
  res = joints._score_kind(jcfg, model, None, windows, "distant", special_ids=[6])
  assert res["pairs"] == 3 and res["mean_distance"] >= 2 and not res["ar_reference"]
  per = res["per_pair"]
  assert all(a <= m + 1e-6 for a, m in zip(per["ag"]["kl_all"], per["mrf"]["kl_all"]))
  row = res["figures"]["ag"]
  assert row["p_ppl"] == pytest.approx(np.exp(np.mean(per["ag"]["nll_pair"]) / 2))
  table = joints.format_table({"run": "r", "step": 1, "exact": True, "support": 7, "vocab_size": 7,
                               "ag_tol": 1e-7, "ag_iterations": 9, "kinds": {"distant": res}})
  assert "## distant" in table and table.count("| AG (closest conditionals) |") == 1


def test_top_k_candidates_hold_the_truth_and_both_predictions_best():
  single = jnp.asarray([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0]])
  double = jnp.asarray([[6.0, 0.0, 5.0, 1.0, 4.0, 2.0]])
  ids = np.asarray(jax.jit(joints._candidates, static_argnums=3)(jnp.asarray([3]), single,
                                                                    double, 4))[0]
  np.testing.assert_array_equal(ids, [3, 1, 0, 2])  # truth; best single (5 is 2nd); double's best


# ----------------------------------------------------------------------------- the AR reference


def test_ar_reference_equals_brute_force_likelihoods_and_scores_end_pairs():
  ar, vocab = _tiny(kind="ar", seed=2), 7
  windows = np.random.default_rng(2).integers(0, vocab, (5, 12)).astype(np.int32)
  i_B, j_B = np.asarray([10, 2, 6]), np.asarray([11, 11, 11])
  got = np.asarray(joints.ar_pair_joint(ar, windows[:3], i_B, j_B, chunk=3))
  rows = np.repeat(windows[:3, None], vocab * vocab, axis=1)  # every (a, b) of each pair
  rows[np.arange(3)[:, None], :, i_B[:, None]] = np.repeat(np.arange(vocab), vocab)
  rows[np.arange(3)[:, None], :, j_B[:, None]] = np.tile(np.arange(vocab), vocab)
  rows = jnp.asarray(rows.reshape(-1, 12))
  logp = jax.nn.log_softmax(_forward(ar, rows, None), axis=-1)  # whole sequences, brute force
  total = np.asarray(jnp.take_along_axis(logp[:, :-1], rows[:, 1:, None], -1)[..., 0].sum(-1))
  total = total.reshape(3, vocab, vocab)
  ref = total - np.log(np.exp(total).sum(axis=(1, 2), keepdims=True))
  np.testing.assert_allclose(got, ref, atol=2e-5)
  # the CLI's scoring of end pairs: window 0's adjacent pair is pair 0 above
  jcfg = joints.JointsConfig(run="-", num_pairs=3, batch_size=3, chunk=3)
  res = joints._score_kind(jcfg, _tiny(seed=3), ar, windows, "adjacent_end", special_ids=[])
  assert res["ar_reference"] and res["mean_distance"] == 1
  assert res["per_pair"]["ar"]["nll_pair"][0] == pytest.approx(
      -ref[0, windows[0, 10], windows[0, 11]], abs=2e-5)
  assert set(res["per_pair"]["hcb"]) >= {"kl_to_ar", "nll_pair", "kl_all", "kl_true"}


def test_sample_pairs_follow_their_kind_and_avoid_special_tokens():
  windows = np.tile(np.arange(10, dtype=np.int32), (6, 1))
  windows[:, 4] = 99  # a special token at position 4 of every window
  windows[1, 9] = 99  # and at the end of window 1
  for kind in ("adjacent", "distant", "adjacent_end", "distant_end"):
    rows, i, j = joints.sample_pairs(windows, kind, 4, seed=0, special_ids=[99])
    assert len(rows) == 4 and np.all(i < j) and not np.any((i == 4) | (j == 4))
    gap = j - i
    assert np.all(gap == 1) if "adjacent" in kind else np.all(gap >= 2)
    if kind.endswith("_end"):
      assert np.all(j == 9) and 1 not in rows and np.all(i >= 1)
  rows, i, j = joints.sample_pairs(windows, "positions", 3, 0, positions=[(7, 2), (0, 5)])
  assert list(zip(i, j)) == [(7, 2), (0, 5), (7, 2)]


# ----------------------------------------------------------------------------- refusals


def _never_compiled(*args, **kwargs):
  raise AssertionError("the jitted function was reached")


@pytest.mark.parametrize("i,j,top_k,match", [
    (3, 10, None, "out of range"), (-1, 2, None, "out of range"), (4, 4, None, "i = j"),
    (1, 2, 8, "top_k=8 must lie in"), (1, 2, 1, "top_k=1 must lie in"),
    (1, 2, 0, "top_k=0 must lie in")])
def test_bad_pairs_are_refused_before_compiling(monkeypatch, i, j, top_k, match):
  monkeypatch.setattr(joints, "_tables", _never_compiled)
  monkeypatch.setattr(joints, "_one_joint", _never_compiled)
  model, tokens = _tiny(), np.zeros((1, 10), np.int32)
  with pytest.raises(ValueError, match=match):
    joints.pair_tables(model, tokens, [i], [j], top_k=top_k)
  with pytest.raises(ValueError, match=match):
    joints.construction_joint(model, tokens, [i], [j], "hcb", top_k=top_k)


def test_an_ar_model_is_refused_as_the_denoiser_and_a_denoiser_as_the_reference(monkeypatch):
  monkeypatch.setattr(joints, "_tables", _never_compiled)
  monkeypatch.setattr(joints, "_ar_joint", _never_compiled)
  tokens = np.zeros((1, 8), np.int32)
  with pytest.raises(ValueError, match="bidirectional denoiser"):
    joints.pair_tables(_tiny(kind="ar"), tokens, [1], [2])
  with pytest.raises(ValueError, match="needs an AR model"):
    joints.ar_pair_joint(_tiny(), tokens, [1], [7])
  with pytest.raises(ValueError, match="last real position"):
    joints.ar_pair_joint(_tiny(kind="ar"), tokens, [1], [6])


def _fake_run(tmp_path, kind="denoiser", name="run", tokenizer=None):
  """A run directory with a config and a tokenizer, and no weights."""
  cfg = tiny_config()
  cfg.model = cfg.model.replace(kind=kind)
  run = RunDir(str(tmp_path / name))
  os.makedirs(run.path)
  run.write_config(cfg)
  (tokenizer or ByteTokenizer()).save(run.tokenizer_dir)
  return run.path


@pytest.mark.parametrize("overrides,match", [
    ({"positions": [[3, 32]]}, r"positions: \[3, 32\] must be two positions in \[0, 31\]"),
    ({"positions": [[5, 5]]}, "has i = j"),
    ({"top_k": 260}, "top_k=260 must lie in"),
    ({"kinds": ["nearby"]}, "kinds="),
    ({"ar_run": "AR"}, "only for pairs that end the window"),
    ({"ar_run": "DENOISER", "kinds": ["adjacent_end"]}, "the reference must be an AR run"),
    ({"ar_run": "AR_CHAR", "kinds": ["adjacent_end"]}, "has another tokenizer"),
    ({"run": "AR"}, "not a bidirectional denoiser run")])
def test_the_cli_refuses_bad_input_before_loading_weights(tmp_path, overrides, match):
  runs = {"DENOISER": _fake_run(tmp_path), "AR": _fake_run(tmp_path, "ar", "ar"),
          "AR_CHAR": _fake_run(tmp_path, "ar", "ar_char", CharTokenizer("abc"))}
  settings = {k: runs.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
  jcfg = joints.JointsConfig(**{"run": runs["DENOISER"], **settings})
  with pytest.raises(ValueError, match=match):
    joints.run_joints(jcfg)


@pytest.mark.slow  # trains two tiny runs; the README's mdlm.joints commands run by default
def test_the_cli_writes_its_table(tiny_run, tiny_ar_run, tmp_path):
  output = str(tmp_path / "joints.json")
  record = joints.run_joints(joints.JointsConfig(run=tiny_run, num_pairs=3, top_k=6,
                                                 batch_size=2, output=output))
  with open(output) as f:
    saved = json.load(f)
  assert saved["kinds"].keys() == {"adjacent", "distant"} and saved["support"] == 6
  for kind, res in saved["kinds"].items():
    assert res["pairs"] == 3 and set(res["figures"]) == set(joints.CONSTRUCTIONS) | {
        "conditionals"}
    assert all(np.isfinite(r["u_ppl"]) and r["u_ppl"] >= 1 for r in res["figures"].values())
    ag, mrf = res["figures"]["ag"], res["figures"]["mrf"]
    assert ag["kl_all"] <= mrf["kl_all"] + 1e-6
  assert res["mean_distance"] >= 2 and saved["kinds"]["adjacent"]["mean_distance"] == 1
  table = open(str(tmp_path / "joints.md")).read()
  assert "## adjacent" in table and "| AG (closest conditionals) |" in table
  assert record["output"] == output
  ar_out = str(tmp_path / "joints_ar.json")
  record = joints.run_joints(joints.JointsConfig(
      run=tiny_run, ar_run=tiny_ar_run, kinds=["adjacent_end", "distant_end"], num_pairs=2,
      top_k=6, batch_size=2, output=ar_out))
  for res in record["kinds"].values():
    assert res["ar_reference"] and res["figures"]["ar"]["p_ppl"] >= 1
    assert "kl_to_ar" in res["figures"]["ag"]
  assert "AR model, exact joint (reference)" in open(str(tmp_path / "joints_ar.md")).read()
