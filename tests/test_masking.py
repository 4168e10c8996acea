"""The masked-LM family (objective=diffusion with masking.*): counts, content, corruption, the
weightings, importance-sampled time, and the refusals; checked against closed forms, exact
oracles and independent numpy computations."""

import dataclasses
import math
import re
import types
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mdlm import config as config_lib
from mdlm import masking, objectives, schedules
from mdlm.config import MaskingConfig
from tests.test_diffusion import JOINT, MASK, SEQS, exact_conditional_logits

V_BIG, PAD, BOS, EOS = 50, 47, 48, 49   # a 50-token vocabulary whose last three ids are special


def _objective(mask_id=V_BIG, total_steps=100, token_classes=None, **masking_kw):
  setup = objectives.Setup(schedule=schedules.get("loglinear"), mask_id=mask_id, bos_id=BOS,
                           special_ids=(BOS, EOS, PAD), total_steps=total_steps,
                           masking=MaskingConfig(**masking_kw).validate(),
                           token_classes=token_classes)
  return objectives.build(objectives.settings_for(config_lib.Config(), "diffusion"), setup)


def _batch(rows=64, length=40, seed=0, pad_from=None):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 47, (rows, length)).astype(np.int32)
  token_mask = np.ones((rows, length), bool)
  if pad_from is not None:  # row b has pad_from[b] real tokens, then padding
    token_mask = np.arange(length)[None, :] < np.asarray(pad_from)[:, None]
    tokens = np.where(token_mask, tokens, PAD)
  return {"tokens": jnp.asarray(tokens), "token_mask": jnp.asarray(token_mask)}


def _draw(objective, batch, seed=0, step=0, state=None):
  state = objective.init_state() if state is None else state
  return {k: np.asarray(v) for k, v in
          objective.draw(batch, jax.random.key(seed), jnp.int32(step), state).items()}


class FixedLogits:
  """A stand-in denoiser: fixed random logits [B, L, V + 1] whatever the input."""

  def __init__(self, shape, seed=0):
    self.logits = jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2, jnp.float32)
    self.cfg = types.SimpleNamespace(time_conditioning=False)

  def __call__(self, xt, noise=None, **kw):
    return self.logits


class Oracle:
  """The exact conditionals of tests.test_diffusion's known joint, as a denoiser."""

  cfg = types.SimpleNamespace(time_conditioning=False)

  def __call__(self, xt, noise=None, **kw):
    return exact_conditional_logits(xt)


# ----------------------------------------------------------------------------- how many


@pytest.mark.parametrize("p", [0.15, 0.4, 0.8])
def test_fixed_ratio_masks_exactly_round_p_n_and_never_padding(p):
  lengths = np.random.default_rng(1).integers(1, 41, 64)
  batch = _batch(pad_from=lengths)
  out = _draw(_objective(ratio="fixed", p=p, weighting="sum_masked"), batch)
  n = np.asarray(batch["token_mask"]).sum(1)
  expected = [math.floor(Fraction(str(p)) * k + Fraction(1, 2)) for k in n]  # halves rounded up
  np.testing.assert_array_equal(out["scored"].sum(1), expected)
  assert not (out["scored"] & ~np.asarray(batch["token_mask"])).any()
  np.testing.assert_array_equal(out["xt"][out["scored"]], V_BIG)
  np.testing.assert_array_equal(out["xt"][~out["scored"]], np.asarray(batch["tokens"])[~out["scored"]])


def test_uniform_ratio_counts_are_uniform_on_one_to_n():
  """u-PMLM: k ~ U{1, ..., n}; ceil(u n) of a stratified u covers 1..n evenly."""
  objective = _objective(ratio="uniform", weighting="mean_masked")
  batch = _batch(rows=50, length=10)
  counts = np.concatenate([_draw(objective, batch, seed=s)["scored"].sum(1) for s in range(40)])
  assert counts.min() >= 1 and counts.max() <= 10
  observed = np.bincount(counts, minlength=11)[1:]
  assert stats.chisquare(observed).pvalue > 1e-3
  # max_ratio: k ~ U{1, ..., round(0.5 n)}.
  half = _objective(ratio="uniform", max_ratio=0.5, weighting="mean_masked")
  assert _draw(half, batch)["scored"].sum(1).max() <= 5


@pytest.mark.parametrize("form", ["linear", "cosine"])
def test_decay_ratio_follows_the_closed_form(form):
  """Yang et al. 2023: cosine p0 (1 + cos(pi s / S)) + 0.02, linear 2 p0 (1 - s / S)."""
  total, p0 = 100, 0.15
  objective = _objective(total_steps=total, ratio="decay", p=p0, decay=form,
                         weighting="sum_masked")
  batch = _batch(rows=4, length=1000)
  for step in (0, 10, 37, 50, 99):
    ratio = (p0 * (1 + math.cos(math.pi * step / total)) + 0.02 if form == "cosine"
             else 2 * p0 * (1 - step / total))
    assert float(masking.decay_ratio(step, total, p0, form)) == pytest.approx(ratio, abs=1e-6)
    counts = _draw(objective, batch, step=step)["scored"].sum(1)
    np.testing.assert_array_equal(counts, masking.mask_count(1000, round(ratio, 4)))


# ----------------------------------------------------------------------------- which


def _runs(row):
  """Lengths of the runs of True in a boolean row."""
  padded = np.concatenate([[False], row, [False]]).astype(int)
  edges = np.diff(padded)
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_span_masking_has_mean_span_and_exact_ratio_and_stops_at_padding():
  lengths = np.random.default_rng(2).integers(60, 129, 256)
  batch = _batch(rows=256, length=128, pad_from=lengths)
  objective = _objective(ratio="fixed", p=0.4, content="span", span_mean=3.0,
                         weighting="sum_masked")
  out = _draw(objective, batch)
  n = np.asarray(batch["token_mask"]).sum(1)
  np.testing.assert_array_equal(out["scored"].sum(1),
                                [math.floor(Fraction(2, 5) * k + Fraction(1, 2)) for k in n])
  assert not (out["scored"] & ~np.asarray(batch["token_mask"])).any()
  runs = np.concatenate([_runs(r) for r in out["scored"]])
  # Spans are never adjacent (gaps are >= 1 between spans), so runs are the spans themselves.
  assert runs.mean() == pytest.approx(3.0, rel=0.05)
  # Near-geometric lengths: many spans of 1 and a long tail, not a constant length of 3.
  assert (runs == 1).mean() > 0.2 and runs.max() >= 10


def test_weighted_content_masks_high_loss_classes_more_and_keeps_the_ratio():
  classes = np.arange(V_BIG) % 2                       # two classes: even and odd ids
  objective = _objective(ratio="fixed", p=0.3, content="weighted", weighting="sum_masked",
                         token_classes=classes)
  state = {"class_loss": jnp.asarray([1.0, 3.0])}     # class 1 (odd ids) has the higher loss
  batch = _batch(rows=256, length=40)
  out = _draw(objective, batch, state=state)
  tokens = np.asarray(batch["tokens"])
  np.testing.assert_array_equal(out["scored"].sum(1), np.full(256, 12))   # round(0.3 x 40)
  rate = [out["scored"][(tokens % 2) == c].mean() for c in (0, 1)]
  assert rate[1] > 1.5 * rate[0]
  # sigmoid(2 z) of the z-scored losses: z = -/+ 1 / sqrt(2) for two classes.
  w = np.asarray(masking.class_weights(state["class_loss"]))
  z = np.array([-1.0, 1.0]) / math.sqrt(2)
  np.testing.assert_allclose(w, 1 / (1 + np.exp(-2 * z)), rtol=1e-6)
  # Equal losses: equal weights 0.5; an unseen class keeps its value under the EMA update.
  np.testing.assert_allclose(masking.class_weights(jnp.zeros(3)), 0.5)
  ce = jnp.ones((1, 4)) * 2.0
  chosen = jnp.asarray([[True, True, False, False]])
  cls = jnp.asarray([[0, 0, 1, 1]])
  new = masking.update_class_loss(jnp.asarray([1.0, 5.0]), ce, chosen, cls, 0.9)
  np.testing.assert_allclose(new, [0.9 * 1.0 + 0.1 * 2.0, 5.0], rtol=1e-6)


def test_weighted_selection_probabilities_follow_the_weights():
  """Gumbel top-1 over [1, 2, 4, 1] picks each position with probability w / sum(w)."""
  log_w = jnp.log(jnp.asarray([[1.0, 2.0, 4.0, 1.0]] * 4000))
  eligible = jnp.ones((4000, 4), bool)
  chosen = np.asarray(masking.choose_weighted(jax.random.key(0), eligible, jnp.ones(4000, int),
                                              log_w))
  assert stats.chisquare(chosen.sum(0), 4000 * np.array([1, 2, 4, 1]) / 8).pvalue > 1e-3


def test_frequency_classes_have_equal_token_mass():
  counts = np.array([1000, 500, 250, 125, 60, 30, 20, 10, 5, 0])
  classes = masking.frequency_classes(counts, 2)
  assert classes[0] == 0 and classes[-1] == 1 and classes[-2] == 1
  mass = [counts[classes == c].sum() for c in (0, 1)]
  assert abs(mass[0] - mass[1]) <= 1000


# ----------------------------------------------------------------------------- into what


def test_bert_corruption_proportions_and_replacements():
  """Of the chosen positions 80% become the mask, 10% a uniform real token, 10% stay; the
  replacements are never the mask, padding, BOS or EOS; every chosen position is scored."""
  batch = _batch(rows=512, length=64)
  objective = _objective(ratio="fixed", p=0.5, corruption="bert", weighting="sum_masked")
  out = _draw(objective, batch)
  x0, chosen, xt = np.asarray(batch["tokens"]), out["scored"], out["xt"]
  masked = chosen & (xt == V_BIG)
  kept = chosen & (xt == x0)
  replaced = chosen & ~masked & ~kept
  n = chosen.sum()
  # A random token equal to the original is "kept" (probability 1/47 of the random tenth).
  p_keep = 0.1 + 0.1 / 47
  expected = n * np.array([0.8, 0.1 - 0.1 / 47, p_keep])
  observed = np.array([masked.sum(), replaced.sum(), kept.sum()])
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  new_tokens = xt[replaced]
  assert not np.isin(new_tokens, [V_BIG, PAD, BOS, EOS]).any()
  assert stats.chisquare(np.bincount(new_tokens, minlength=47)[:47]).pvalue > 1e-3
  assert (xt[~chosen] == x0[~chosen]).all()


# ----------------------------------------------------------------------------- the weightings


@pytest.mark.parametrize("ratio,weighting", [("uniform", "mean_masked"), ("uniform", "sum_masked"),
                                             ("fixed", "mean_masked"), ("schedule", "sum_masked")])
def test_weightings_equal_an_independent_numpy_computation(ratio, weighting):
  lengths = np.random.default_rng(3).integers(1, 25, 16)
  batch = _batch(rows=16, length=24, pad_from=lengths)
  objective = _objective(ratio=ratio, p=0.3, weighting=weighting)
  drawn = {**batch, **objective.draw(batch, jax.random.key(4), 0, None)}
  model = FixedLogits((16, 24, V_BIG + 1))
  terms, _ = objective.loss(model, drawn, None)
  loss = float(jnp.sum(terms.nll_sum_B) / objective.denominator(drawn))

  z = np.asarray(model.logits, np.float64)[..., :V_BIG]   # the mask logit is removed
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1,
                                                                                       keepdims=True)
  x0, scored = np.asarray(batch["tokens"]), np.asarray(drawn["scored"])
  ce = -np.take_along_axis(logp, x0[..., None], -1)[..., 0]
  per_row = [(ce[b][scored[b]].sum(), scored[b].sum()) for b in range(16)]
  if weighting == "sum_masked":
    ref = sum(s for s, _ in per_row) / sum(c for _, c in per_row)
  else:
    means = [s / c for s, c in per_row if c > 0]
    ref = float(np.mean(means))
  assert loss == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------- importance


def _oracle_estimates(objective, state, n, seed, idx=17):
  x0 = jnp.tile(jnp.asarray(SEQS[idx])[None], (n, 1))
  batch = {"tokens": x0, "token_mask": jnp.ones(x0.shape, bool)}
  drawn = {**batch, **objective.draw(batch, jax.random.key(seed), 0, state)}
  terms, _ = objective.loss(Oracle(), drawn, None)
  return np.asarray(terms.nll_sum_B, np.float64), drawn


def _oracle_objective(schedule="loglinear", **kw):
  setup = objectives.Setup(schedule=schedules.get(schedule), mask_id=MASK,
                           masking=MaskingConfig(**kw).validate())
  return objectives.build(objectives.settings_for(config_lib.Config(), "diffusion"), setup)


@pytest.mark.parametrize("proposal", ["beta", "histogram"])
def test_importance_weighted_nelbo_equals_the_true_nll(proposal):
  """With the exact conditionals, sum_i w(t) / q(t) CE_i has mean -log p(x) for a non-uniform
  proposal: a Beta(0.6, 1.4) or a fixed, lopsided histogram."""
  idx = 17
  true_nll = -math.log(JOINT[idx])
  if proposal == "beta":
    objective = _oracle_objective(ratio="importance", proposal="beta", beta_a=0.6, beta_b=1.4)
    state = None
  else:
    objective = _oracle_objective(ratio="importance", proposal="adaptive", bins=8, history=2)
    values = jnp.repeat(jnp.asarray([8.0, 4, 2, 1, 1, 1, 0.5, 0.5])[:, None], 2, axis=1)
    state = {"times": {"values": values, "count": jnp.full((8,), 2, jnp.int32)}}
  est, drawn = _oracle_estimates(objective, state, 20000, 0, idx)
  assert np.ptp(drawn["q"]) > 0.5   # really non-uniform
  se = est.std() / math.sqrt(len(est))
  assert abs(est.mean() - true_nll) < 4 * se + 0.01 * true_nll, (est.mean(), true_nll, se)


def test_beta_proposal_density_matches_scipy():
  t, q = masking.beta_times(jax.random.key(0), 64, 0.6, 1.4, t_min=1e-3)
  x = (np.asarray(t) - 1e-3) / (1 - 1e-3)
  np.testing.assert_allclose(np.asarray(q) * (1 - 1e-3), stats.beta.pdf(x, 0.6, 1.4), rtol=2e-3)
  # Inverse CDF of stratified uniforms: one draw per stratum of the Beta's quantiles.
  u = np.sort(stats.beta.cdf(x, 0.6, 1.4))
  assert (np.floor(u * 64) == np.arange(64)).all()


def test_adaptive_proposal_lowers_the_variance():
  """Warm the histogram through the trainer's own update_state (uniform draws until every bin
  holds its history), then draw from it: the same mean, -log p(x), with a much lower variance
  than uniform t. Under the linear-in-sigma schedule the NELBO's integrand is far from flat in t
  (under log-linear it is nearly flat already, and the gain is small)."""
  uniform = _oracle_objective(schedule="linear")
  adaptive = _oracle_objective(schedule="linear", ratio="importance", proposal="adaptive",
                               bins=16, history=200, uniform_mix=0.01)
  state = adaptive.init_state()
  for seed in range(8):
    est_u, drawn = _oracle_estimates(adaptive, state, 512, 100 + seed)
    terms = types.SimpleNamespace(nll_sum_B=jnp.asarray(est_u), num_tokens_B=jnp.full(512, 4.0))
    state = adaptive.update_state(state, drawn, terms, {})
  assert int(state["times"]["count"].min()) >= 200
  base, _ = _oracle_estimates(uniform, None, 20000, 1)
  est, drawn = _oracle_estimates(adaptive, state, 20000, 2)
  assert np.ptp(drawn["q"]) > 0.5
  true_nll = -math.log(JOINT[17])
  for values in (base, est):
    se = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - true_nll) < 4 * se + 0.01 * true_nll
  assert est.var() < 0.5 * base.var(), (est.var(), base.var())


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,part", [
    (dict(ratio="fixd"), "masking.ratio='fixd'"),
    (dict(content="spans"), "masking.content"),
    (dict(corruption="bert80"), "masking.corruption"),
    (dict(ratio="fixed", p=1.0, weighting="sum_masked"), "masking.p=1.0 must lie in"),
    (dict(ratio="fixed", p=0.0, weighting="sum_masked"), "masking.p=0.0 must lie in"),
    (dict(ratio="fixed", p=0.15), "not be a bound"),
    (dict(corruption="bert"), "not be a bound"),
    (dict(ratio="decay", weighting="elbo"), "not be a bound"),
    (dict(content="span"), "not be a bound"),
    (dict(ratio="importance", weighting="sum_masked"), "needs masking.weighting=elbo"),
    (dict(ratio="decay", p=0.6, weighting="sum_masked"), "starts at 1.22"),
])
def test_masking_refusals(kw, part):
  cfg = config_lib.Config(masking=MaskingConfig(**kw))
  with pytest.raises(ValueError, match=part.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(cfg)


def test_objective_and_phase_refusals():
  cfg = config_lib.Config(objective=config_lib.ObjectiveConfig(name="mlm"))
  with pytest.raises(ValueError, match="objective='mlm' is not a registered objective"):
    config_lib.validate(cfg)
  phase = config_lib.PhaseConfig
  for phases, part in (([phase("ar", 0), phase("diffusion", 10)], r"phases\[0\].steps=0"),
                       ([phase("bert", 5), phase("ar", 5)], r"phases\[0\].objective='bert'"),
                       ([phase("ar", 5), phase("diffusion", 4)], "add up to 9 steps")):
    cfg = config_lib.Config(train=config_lib.TrainConfig(steps=10, phases=phases))
    with pytest.raises(ValueError, match=part):
      config_lib.validate(cfg)
  # masking.* on a run that trains no masked objective is a mistake, refused.
  cfg = config_lib.Config(masking=MaskingConfig(ratio="fixed", weighting="sum_masked"))
  cfg.model = cfg.model.replace(kind="ar")
  with pytest.raises(ValueError, match="masking.\\* settings apply to the masked objectives"):
    config_lib.validate(cfg)


def test_config_dataclass_defaults_are_mdlm():
  m = MaskingConfig()
  assert dataclasses.astuple(m) == dataclasses.astuple(MaskingConfig())
  assert m.is_default and (m.ratio, m.content, m.corruption, m.weighting) == (
      "schedule", "random", "mask", "elbo")


PRESETS = ["mlm15", "mlm40", "mlm80", "mlm15_bert", "mlm40_span", "upmlm", "mrd_linear",
           "mrd_cosine", "ptw", "antlm", "mdlm_is"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_compose_cite_their_paper_and_validate(name):
  import os
  from hydra import compose, initialize_config_dir
  from hydra.core.global_hydra import GlobalHydra
  from tests.helpers import REPO
  path = os.path.join(REPO, "configs", "experiment", f"{name}.yaml")
  header = open(path).read().split("masking:")[0]
  # A paper cited by title (in quotes), authors and year.
  assert re.search(r'"[A-Z][^"]+"', header) and re.search(r"(et al\.|\w+ and \w+) 20\d\d", header)
  GlobalHydra.instance().clear()
  config_lib.register_configs()
  with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
    cfg = config_lib.to_config(compose("config", overrides=[f"experiment={name}"]))
  assert cfg.model.d_model == 256 and cfg.train.steps == 500   # the default size and budget
  assert cfg.masking != MaskingConfig() or name == "antlm"
