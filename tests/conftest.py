"""Test setup: CPU only, deterministic, small thread pools (the suite targets a 2-core CPU)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _share_compilations():
  """One persistent XLA compilation cache for the whole session: its pytest-xdist workers and
  the subprocesses it starts inherit the directory through the environment. Most tests compile
  the same tiny programs, and compiling is most of their time. The directory is new for every
  session (a cold start, as on CI) and removed at its end; MDLM_TEST_COMPILATION_CACHE names a
  directory to keep instead."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    path = os.environ.get("MDLM_TEST_COMPILATION_CACHE")
    if not path:
      path = tempfile.mkdtemp(prefix="mdlm-test-xla-")
      atexit.register(shutil.rmtree, path, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_compilations()  # the controller runs this first; its workers inherit the variables

import pytest  # noqa: E402


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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(items):
  """pytest-xdist (--dist loadgroup) keeps each module on one worker, so its module- and
  session-scoped fixtures are built once, unless the module spreads its tests by giving them
  their own `xdist_group` (tests/test_readme.py does)."""
  for item in items:
    if item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
