"""The trainer's first training loss, recomputed independently: the initial weights, the first
batch and the step's own random draw, scored in numpy. A wrong weight, a masking that does not
happen, a wrong denominator or the wrong attention each changes the number."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm import data as data_lib
from mdlm import models, rundir, train
from tests.helpers import tiny_config, train_losses


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _first_step(cfg, run_dir):
  """(trainer's step-1 loss, initial model, first batch, the step's key)."""
  cfg.train.steps, cfg.train.log_every = 1, 1
  train.run(cfg, run_dir)
  loaded = rundir.load_run(run_dir)
  model = models.build(loaded.model.cfg, seed=cfg.train.seed)
  ds = data_lib.build_dataset(cfg.data, loaded.tokenizer, split="train",
                              batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                              cache_dir=rundir.RunDir(run_dir).data_cache_dir)
  batch = {k: np.asarray(v) for k, v in next(iter(ds)).items()}
  key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)  # fold_in(rng, step 0)
  return train_losses(run_dir)[1], model, batch, key, loaded.tokenizer


def test_diffusion_first_loss_is_the_nelbo_per_token(tmp_path):
  cfg = tiny_config()
  loss, model, batch, key, _ = _first_step(cfg, str(tmp_path / "run"))
  x0, real = batch["tokens"], batch["token_mask"]
  b, length = x0.shape
  # The draw: t_i = t_min + (1 - t_min)((u + i/B) mod 1); each real token masked w.p. t (1 - eps).
  k0 = jax.random.fold_in(key, 0)
  u = float(jax.random.uniform(jax.random.fold_in(k0, 0), (), jnp.float32))
  t = 1e-3 + (1 - 1e-3) * np.mod(np.float32(u) + np.arange(b, dtype=np.float32) / b, 1.0)
  move = np.asarray(jax.random.uniform(jax.random.fold_in(k0, 1), x0.shape, jnp.float32))
  masked = (move < (1 - 1e-3) * t[:, None]) & real
  assert 0.3 < masked.sum() / real.sum() < 0.7   # about half the tokens: masking happened
  xt = np.where(masked, model.mask_id, x0)
  logp = _log_softmax(np.asarray(model(jnp.asarray(xt)))[..., :model.mask_id])
  ce = -np.take_along_axis(logp, x0[..., None], -1)[..., 0]
  weight = (1 - 1e-3) / t   # (1 - t_min) w(t), w(t) = 1/t for the log-linear schedule
  expected = float(np.sum(np.where(masked, weight[:, None] * ce, 0.0)) / real.sum())
  assert loss == pytest.approx(expected, rel=2e-5)


def test_ar_first_loss_is_the_causal_next_token_nll(tmp_path):
  cfg = tiny_config()
  cfg.model = cfg.model.replace(kind="ar")
  loss, model, batch, _, _ = _first_step(cfg, str(tmp_path / "run"))
  x = batch["tokens"]
  logp = _log_softmax(np.asarray(model(jnp.asarray(x)))[:, :-1])
  nll = -np.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]
  assert loss == pytest.approx(float(nll.mean()), rel=2e-5)
  # The same weights with bidirectional attention would give a different (lower) number.
  logp_bi = _log_softmax(np.asarray(model(jnp.asarray(x), causal=False))[:, :-1])
  assert abs(-np.take_along_axis(logp_bi, x[:, 1:, None], -1).mean() - loss) > 0.01


def test_meap_first_loss_masks_inputs_and_scores_clean_targets(tmp_path):
  cfg = tiny_config(objective="meap")
  cfg.model = cfg.model.replace(kind="ar")
  loss, model, batch, key, tokenizer = _first_step(cfg, str(tmp_path / "run"))
  x = batch["tokens"]
  b, length = x.shape
  # Eligible: real, not BOS, not the last position; exactly round(0.15 n) of them, the lowest
  # uniform scores of the step's draw (fold_in(key, 1)).
  eligible = (x != tokenizer.bos_id) & (np.arange(length) < length - 1)[None, :]
  count = np.floor(0.15 * eligible.sum(1) + 0.5).astype(int)
  score = np.where(eligible, np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), x.shape)),
                   2.0)
  rank = np.argsort(np.argsort(score, axis=1), axis=1)
  inputs = np.where(eligible & (rank < count[:, None]), model.mask_id, x)
  assert (inputs == model.mask_id).sum() == count.sum() > 0
  logp = _log_softmax(np.asarray(model(jnp.asarray(inputs)))[:, :-1])
  nll = -np.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]
  assert loss == pytest.approx(float(nll.mean()), rel=2e-5)
  assert math.isfinite(loss)
