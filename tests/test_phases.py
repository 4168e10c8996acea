"""AntLM-style training phases (train.phases): one model under causal and bidirectional
attention in turn, with exact resume across a phase boundary."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm import config as config_lib
from mdlm import evaluate, rundir, train
from mdlm.models import build, presets
from tests.helpers import StopAfter, read_metrics, tiny_config, train_losses

PHASES = [config_lib.PhaseConfig("ar", 3), config_lib.PhaseConfig("diffusion", 3),
          config_lib.PhaseConfig("ar", 2)]


def _phase_config(**kw):
  cfg = tiny_config(steps=8, eval_every=8, checkpoint_every=4, **kw)
  cfg.train.phases = [config_lib.PhaseConfig(p.objective, p.steps) for p in PHASES]
  return cfg


def test_attention_follows_the_objective():
  """During AR phases the output at i does not depend on inputs after i; during masked phases
  it does (one model, the attention switched by the objective)."""
  model = build(presets.get("tiny", vocab_size=30, max_seq_len=16), seed=0)
  x = jax.random.randint(jax.random.key(0), (2, 16), 0, 30)
  y = x.at[:, 9:].set((x[:, 9:] + 7) % 30)   # change every input after position 8
  for causal, should_change in ((True, False), (False, True)):
    a, b = model(x, causal=causal), model(y, causal=causal)
    changed = not np.allclose(np.asarray(a[:, :9]), np.asarray(b[:, :9]), atol=1e-6)
    assert changed == should_change, causal


def test_phase_schedule():
  tc = config_lib.TrainConfig(steps=8, phases=PHASES)
  assert [train.phase_at(s, tc)[1] for s in range(8)] == ["ar"] * 3 + ["diffusion"] * 3 + ["ar"] * 2
  assert [train.phase_at(s, tc)[0] for s in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
  cyc = config_lib.TrainConfig(steps=10, phase_cycle=True, phases=[
      config_lib.PhaseConfig("ar", 2), config_lib.PhaseConfig("diffusion", 2)])
  assert [train.phase_at(s, cyc)[1] for s in range(6)] == ["ar", "ar", "diffusion", "diffusion",
                                                          "ar", "ar"]


def test_phases_train_log_checkpoint_and_resume_exactly(tmp_path, monkeypatch):
  straight = str(tmp_path / "straight")
  train.run(_phase_config(), straight)
  events = [m for m in read_metrics(straight) if "train/loss" in m]
  assert [(m["step"], m["phase"], m["objective"]) for m in events] == [
      (1, 0, "ar"), (2, 0, "ar"), (3, 0, "ar"), (4, 1, "diffusion"), (5, 1, "diffusion"),
      (6, 1, "diffusion"), (7, 2, "ar"), (8, 2, "ar")]
  # Both measures are reported: the exact AR NLL and the NELBO.
  val = [m for m in read_metrics(straight) if "val/nll" in m][-1]
  assert np.isfinite(val["val/ar"]) and np.isfinite(val["val/nelbo"]) and val["val/nll"] == val["val/ar"]
  meta = json.load(open(os.path.join(straight, "checkpoints", "4", "meta", "metadata")))
  assert meta["phase"] == 1 and meta["objective"] == "diffusion"

  # Interrupted at step 4, just after the ar -> diffusion boundary (checkpoint 4 is scheduled).
  resumed = str(tmp_path / "resumed")
  monkeypatch.setattr(train, "_StopFlag", lambda: StopAfter(4))
  train.run(_phase_config(), resumed)
  assert json.load(open(os.path.join(resumed, "status.json")))["state"] == "interrupted"
  monkeypatch.undo()
  train.run(_phase_config(), resumed)
  a, b = train_losses(straight), train_losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert all(a[s] == b[s] for s in a), (a, b)  # bit for bit

  # Evaluation offers every measure of both objectives.
  res = evaluate.evaluate_run(evaluate.EvalConfig(run=straight, batch_size=8, max_batches=1,
                                                  measures=["ar", "nelbo", "masked"],
                                                  progress=False))
  assert set(res["measures"]) == {"ar", "nelbo", "masked15", "masked40", "masked80"}
  assert rundir.load_config(straight).train.phases[1].objective == "diffusion"


def test_sigterm_right_after_a_scheduled_checkpoint_is_interrupted(tmp_path, monkeypatch):
  """The stop at step 4 saves step 4 a second time: it must see the checkpoint and exit as
  interrupted (not fail with orbax's StepAlreadyExistsError)."""
  run_dir = str(tmp_path / "run")
  monkeypatch.setattr(train, "_StopFlag", lambda: StopAfter(4))
  train.run(tiny_config(steps=8, checkpoint_every=4), run_dir)
  status = json.load(open(os.path.join(run_dir, "status.json")))
  assert status["state"] == "interrupted" and status["step"] == 4 and status["checkpoint"] == 4


def test_measures_that_do_not_apply_are_refused(tiny_ar_run):
  with pytest.raises(ValueError, match=r"measures \['pll'\] do not apply to a model trained with ar"):
    evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_ar_run, measures=["pll"]))
  with pytest.raises(ValueError, match="Unknown measure 'bleu'"):
    evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_ar_run, measures=["bleu"]))
