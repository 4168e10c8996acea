"""Test setup: CPU only, deterministic, small thread pools (the suite targets a 2-core CPU)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A tiny denoiser trained for a few seconds, shared by the tests that need a checkpoint."""
  from mdlm import train
  from tests.helpers import tiny_config
  run_dir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  train.run(tiny_config(steps=30, eval_every=30, checkpoint_every=30), run_dir)
  return run_dir


@pytest.fixture(scope="session")
def tiny_ar_run(tmp_path_factory):
  """A tiny AR model trained for a few seconds on the same data and tokenizer as `tiny_run`."""
  from mdlm import train
  from tests.helpers import tiny_config
  run_dir = str(tmp_path_factory.mktemp("tiny_ar_run") / "run")
  cfg = tiny_config(steps=30, eval_every=30, checkpoint_every=30)
  cfg.model = cfg.model.replace(kind="ar")
  train.run(cfg, run_dir)
  return run_dir


@pytest.fixture(scope="session")
def tiny_maria_run(tmp_path_factory, tiny_run, tiny_ar_run):
  """A MARIA head (objective=maria) over `tiny_run` and `tiny_ar_run`, trained for a few steps."""
  from mdlm import train
  from tests.helpers import tiny_config
  run_dir = str(tmp_path_factory.mktemp("tiny_maria_run") / "run")
  from mdlm.objectives.maria import MariaConfig
  train.run(tiny_config(steps=4, eval_every=4, checkpoint_every=4,
                        objective=MariaConfig(denoiser_run=tiny_run, ar_run=tiny_ar_run)), run_dir)
  return run_dir
