"""mdlm.host_platform: JAX_PLATFORMS=cpu only where JAX could end nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mdlm import host_platform


@pytest.fixture
def host(monkeypatch):
  """A host with libtpu installed, no TPU device files and no other plugin; each test changes one
  of these."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host_platform.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  monkeypatch.setattr(host_platform, "has_tpu_devices", lambda: False)
  monkeypatch.setattr(host_platform, "has_other_plugins", lambda: False)
  return monkeypatch


def test_libtpu_without_a_tpu_starts_only_the_cpu(host):
  assert host_platform.settle() and os.environ["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("change", ["user", "tpu", "plugin", "no_libtpu"])
def test_anything_else_is_left_to_jax(host, change):
  if change == "user":
    host.setenv("JAX_PLATFORMS", "")
  elif change == "tpu":
    host.setattr(host_platform, "has_tpu_devices", lambda: True)
  elif change == "plugin":
    host.setattr(host_platform, "has_other_plugins", lambda: True)
  else:
    host.setattr(host_platform.importlib.util, "find_spec", lambda name: None)
  assert not host_platform.settle()
  assert os.environ.get("JAX_PLATFORMS") == ("" if change == "user" else None)


def test_an_installed_cuda_plugin_counts(monkeypatch):
  class Dist:
    def __init__(self, name):
      self.metadata = {"Name": name}
  monkeypatch.setattr(host_platform.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(host_platform.importlib.metadata, "distributions",
                      lambda: [Dist("numpy"), Dist("jax-cuda12-plugin")])
  assert host_platform.has_other_plugins()
  monkeypatch.setattr(host_platform.importlib.metadata, "distributions",
                      lambda: [Dist("numpy"), Dist("libtpu")])
  assert not host_platform.has_other_plugins()


def test_a_command_on_this_host_prints_no_tpu_warnings():
  """The import settles the platform before jax starts: no libtpu start-up noise on stderr."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-c", "import mdlm, jax; print(jax.default_backend())"],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  if host_platform.has_tpu_devices() or host_platform.has_other_plugins():
    pytest.skip("this host has an accelerator plugin or TPU: JAX chooses")
  assert proc.stdout.strip() == "cpu"
  assert "TPU" not in proc.stderr, proc.stderr[-2000:]
