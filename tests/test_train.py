"""The trainer: learning, exact resume, signals, sharding equivalence, config and input errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from mdlm import checkpointing, train
from mdlm import rundir
from mdlm import config as config_lib
from tests.helpers import (REPO, StopAfter, read_metrics, run_python, tiny_config,
                           train_losses)


def test_run_writes_its_records(tmp_path):
  """What a run leaves behind: the learning rate it applied at each step, evaluations with
  standard errors in consistent units, and the run directory's files. (That the loss is the
  right number is tests/test_first_step.py's business.)"""
  cfg = tiny_config(steps=40, eval_every=40, log_every=5)
  train.run(cfg, str(tmp_path / "run"))
  status = json.load(open(tmp_path / "run" / "status.json"))
  assert status["state"] == "finished" and status["step"] == 40
  schedule = train.lr_schedule(cfg.optim, cfg.train.steps)
  for m in read_metrics(str(tmp_path / "run")):
    if "train/lr" in m:  # the rate applied at that step: schedule(step - 1)
      assert m["train/lr"] == pytest.approx(float(schedule(m["step"] - 1)))
  evals = [m for m in read_metrics(str(tmp_path / "run")) if "val/nll" in m]
  assert evals and np.isfinite(evals[-1]["val/nll"]) and evals[-1]["val/nll_stderr"] > 0
  assert evals[-1]["val/bpt"] == pytest.approx(evals[-1]["val/nll"] / np.log(2))
  for name in ("config.yaml", "tokenizer", "checkpoints", "tb"):
    assert (tmp_path / "run" / name).exists(), name


def test_exact_resume_is_bit_identical(tmp_path, monkeypatch):
  kw = dict(steps=12, checkpoint_every=4, eval_every=6)
  straight = str(tmp_path / "straight")
  train.run(tiny_config(**kw), straight)

  resumed = str(tmp_path / "resumed")
  monkeypatch.setattr(train, "_StopFlag", lambda: StopAfter(7))
  train.run(tiny_config(**kw), resumed)
  status = json.load(open(os.path.join(resumed, "status.json")))
  assert status["state"] == "interrupted" and status["step"] == 7
  monkeypatch.undo()
  train.run(tiny_config(**kw), resumed)

  a, b = train_losses(straight), train_losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert all(a[s] == b[s] for s in a), (a, b)  # bit for bit
  evals_a = [m["val/nll"] for m in read_metrics(straight) if "val/nll" in m]
  evals_b = [m["val/nll"] for m in read_metrics(resumed) if "val/nll" in m]
  assert evals_a == evals_b
  pa = rundir.load_run(straight, ema=False).model
  pb = rundir.load_run(resumed, ema=False).model
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  run_dir = str(tmp_path / "run")
  train.run(tiny_config(steps=8, checkpoint_every=4, keep_checkpoints=3), run_dir)
  ckpt = os.path.join(run_dir, "checkpoints", "8", "state")
  for root, _, files in os.walk(ckpt):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  train.run(tiny_config(steps=10, checkpoint_every=4, keep_checkpoints=3), run_dir)
  assert any("Checkpoint step 8" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  steps = [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]
  assert steps == list(range(1, 11))  # resumed from step 4: events after it were re-logged
  assert json.load(open(os.path.join(run_dir, "status.json")))["step"] == 10
  assert os.listdir(os.path.join(run_dir, "checkpoints_unreadable"))  # kept, not deleted


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
  run_dir = str(tmp_path / "run")
  train.run(tiny_config(steps=4, checkpoint_every=4), run_dir)
  cfg = tiny_config(steps=12, checkpoint_every=4)
  cfg.optim.lr = 1e30   # diverges at once
  with pytest.raises(train.TrainingError, match=r"Non-finite training (loss|gradient) .* at "
                     r"step \d+\. Stopping; the last checkpoint \(step 4\)"):
    train.run(cfg, run_dir)
  status = json.load(open(os.path.join(run_dir, "status.json")))
  assert status["state"] == "failed" and "Non-finite" in status["message"]
  ckpts = sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())
  assert 4 in ckpts
  run = rundir.load_run(run_dir, ema=False)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(run.model))


def test_incompatible_checkpoint_is_refused_not_discarded(tmp_path):
  run_dir = str(tmp_path / "run")
  train.run(tiny_config(steps=2, checkpoint_every=2), run_dir)
  cfg = tiny_config(steps=4)
  cfg.model = cfg.model.replace(d_model=32)
  with pytest.raises(train.TrainingError, match="model.d_model: 64 -> 32"):
    train.run(cfg, run_dir)
  # Without the config check (a hand-edited config.yaml), orbax's shape check still refuses.
  os.remove(os.path.join(run_dir, "config.yaml"))
  with pytest.raises(checkpointing.CheckpointError, match="does not match"):
    train.run(cfg, run_dir)
  assert "2" in os.listdir(os.path.join(run_dir, "checkpoints"))


def test_sigterm_saves_a_checkpoint(tmp_path):
  run_dir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "mdlm.train", "model=tiny", "tokenizer=byte", "data.seq_len=32",
       "data.max_documents=40", "data.val_fraction=0.2", "train.steps=100000",
       "train.batch_size=8", "train.log_every=1", "train.progress=false",
       f"hydra.run.dir={run_dir}"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline:
    if (run_dir / "metrics.jsonl").exists() and len(read_metrics(str(run_dir))) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  status = json.load(open(run_dir / "status.json"))
  assert status["state"] == "interrupted" and "SIGTERM" in status["message"]
  assert str(status["step"]) in os.listdir(run_dir / "checkpoints")


def test_sharded_equals_single_device(tmp_path):
  script = textwrap.dedent("""
      import json, sys, jax, numpy as np
      from mdlm import train, rundir
      from tests.helpers import tiny_config, train_losses
      data, fsdp, tensor, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
      cfg = tiny_config(steps=4, checkpoint_every=4, eval_every=4)
      cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
      train.run(cfg, out)
      params = rundir.load_run(out, ema=False).model
      np.savez(out + "/params.npz", *[np.asarray(x) for x in jax.tree.leaves(params)])
      print(json.dumps({"devices": jax.device_count(), "losses": train_losses(out)}))
  """)
  results = {}
  for name, mesh, devices in (("single", (1, 1, 1), 1), ("sharded", (2, 2, 2), 8)):
    out = str(tmp_path / name)
    proc = run_python(["-c", script, *map(str, mesh), out], env={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    results[name]["params"] = np.load(out + "/params.npz")
  assert results["sharded"]["devices"] == 8 and results["single"]["devices"] == 1
  la, lb = results["single"]["losses"], results["sharded"]["losses"]
  np.testing.assert_allclose([la[k] for k in sorted(la)], [lb[k] for k in sorted(lb)], rtol=1e-5)
  pa, pb = results["single"]["params"], results["sharded"]["params"]
  for k in pa.files:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_grad_accumulation_matches_full_batch(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.run(tiny_config(steps=3), a)
  cfg = tiny_config(steps=3)
  cfg.optim.grad_accum = 4
  train.run(cfg, b)
  la, lb = train_losses(a), train_losses(b)
  np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=1e-5)


# ----------------------------------------------------------------------------- configs and input


def test_config_validation_messages():
  cfg = tiny_config()
  cfg.data.seq_len = 4096
  with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
    config_lib.validate(cfg)
  cfg = tiny_config()
  cfg.noise.schedule = "cosinus"
  with pytest.raises(ValueError, match="noise.schedule"):
    config_lib.validate(cfg)
  cfg = tiny_config()
  cfg.optim.lr = -1
  with pytest.raises(ValueError, match="optim.lr"):
    config_lib.validate(cfg)
  cfg = tiny_config(objective="ar")
  with pytest.raises(ValueError, match="model.kind=ar"):
    config_lib.validate(cfg)
  cfg = tiny_config()
  cfg.model = cfg.model.replace(num_heads=3)
  with pytest.raises(ValueError, match="divisible"):
    config_lib.validate(cfg)


def test_hydra_refuses_unknown_keys_and_bad_values():
  from hydra import compose, initialize_config_dir
  from hydra.errors import ConfigCompositionException
  config_lib.register_configs()
  with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
    cfg = compose("config", overrides=["model=tiny"])
    assert config_lib.to_config(cfg).model.d_model == 64
    for bad in (["model.bogus=1"], ["trian.steps=3"], ["model=nonexistent"]):
      with pytest.raises(ConfigCompositionException):
        compose("config", overrides=bad)
    with pytest.raises(Exception, match="d_model"):
      compose("config", overrides=["model.d_model=abc"])
    for experiment in ("mdlm_owt", "mdlm_lm1b", "ar_owt", "ar_lm1b", "ar_default"):
      c = config_lib.to_config(compose("config", overrides=[f"experiment={experiment}"]))
      assert c.model.kind == ("ar" if experiment.startswith("ar") else "denoiser")
      if experiment != "ar_default":
        assert (c.train.batch_size, c.optim.lr, c.optim.warmup_steps, c.optim.decay,
                c.optim.grad_clip, c.optim.ema, c.model.dropout, c.model.d_model) == (
                    512, 3e-4, 2500, "constant", 1.0, 0.9999, 0.1, 768)


def test_cli_bad_key_exits_nonzero_before_training(tmp_path):
  proc = run_python(["-m", "mdlm.train", "model=tiny", "model.bogus=1",
                     f"hydra.run.dir={tmp_path}/r"], timeout=120)
  assert proc.returncode != 0 and "bogus" in proc.stderr
  assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["empty", "undecodable"])
def test_bad_corpus_is_refused(tmp_path, case):
  path = tmp_path / "corpus.txt"
  path.write_bytes(b"" if case == "empty" else b"ok line\n\xff\xfe\xfa broken\n")
  cfg = tiny_config()
  cfg.data = config_lib.DataConfig(source="text", path=str(path), seq_len=32)
  with pytest.raises(ValueError, match="corpus.txt"):
    train.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  assert not (tmp_path / "run" / "status.json").exists()


def test_seq_len_beyond_model_refused_before_compile(tmp_path):
  cfg = tiny_config()
  cfg.data.seq_len = 512
  with pytest.raises(ValueError, match="max_seq_len"):
    train.run(cfg, str(tmp_path / "run"))


def test_explicit_resume_without_checkpoint(tmp_path):
  with pytest.raises(train.TrainingError, match="resume=required"):
    train.run(tiny_config(resume="required"), str(tmp_path / "nothing"))


@pytest.mark.slow
def test_hydra_multirun(tmp_path):
  """Slow, and covered in the default run by the README's multirun command (test_readme)."""
  proc = run_python(["-m", "mdlm.train", "-m", "model=tiny", "tokenizer=byte", "data.seq_len=32",
                     "data.max_documents=20", "data.val_fraction=0.2", "train.steps=2",
                     "train.batch_size=4", "train.eval_batches=1", "train.progress=false",
                     "train.seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for job in ("0", "1"):
    status = json.load(open(tmp_path / "sweep" / job / "status.json"))
    assert status["state"] == "finished"


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys, jax
    from mdlm import train
    from tests.helpers import tiny_config, train_losses
    steps, out = int(sys.argv[1]), sys.argv[2]
    cfg = tiny_config(steps=steps, checkpoint_every=2, eval_every=1000)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    train.run(cfg, out)
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                      "losses": train_losses(out)}))
""")


def _mesh_run(steps, out, processes, devices_each):
  """Starts the tiny (2, 2, 2)-mesh run as `processes` JAX processes over loopback."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
  if processes > 1:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    env.update(JAX_NUM_PROCESSES=str(processes), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
  return [subprocess.Popen([sys.executable, "-c", _MESH_SCRIPT, str(steps), out], cwd=REPO,
                           env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(processes)]


def _finish(procs):
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
  return json.loads(outs[0].strip().splitlines()[-1])


def test_two_processes_train_as_one_and_hand_over_their_checkpoint(tmp_path):
  """jax.distributed over loopback: 2 processes x 4 CPU devices give the losses of 1 process x 8
  devices on the same (data, fsdp, tensor) = (2, 2, 2) mesh, and the checkpoint the two wrote
  (step 4) resumes in one process with the losses the one-process run had at steps 5-6."""
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  started = _mesh_run(4, two, processes=2, devices_each=4) + _mesh_run(6, one, 1, 8)
  two_res, one_res = _finish(started[:2]), _finish(started[2:])
  assert (two_res["processes"], two_res["devices"]) == (2, 8)
  assert (one_res["processes"], one_res["devices"]) == (1, 8)
  want = {int(k): v for k, v in one_res["losses"].items()}
  got = {int(k): v for k, v in two_res["losses"].items()}
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)

  resumed = _finish(_mesh_run(6, two, processes=1, devices_each=8))
  got = {int(k): v for k, v in resumed["losses"].items()}
  assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the first four from the two-process run's log
  np.testing.assert_allclose([got[5], got[6]], [want[5], want[6]], rtol=1e-5)
  status = json.load(open(tmp_path / "two" / "status.json"))
  assert status["state"] == "finished" and status["step"] == 6
