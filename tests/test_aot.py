"""Memory levers (scan over layers, rematerialisation, bf16 parameters and optimizer state) and
ahead-of-time compilation of the train step (`mdlm.aot`) for local devices and TPU topologies."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm import aot, models, sharding, train
from mdlm import config as config_lib
from mdlm.models import presets
from mdlm.rundir import RunDir
from tests.helpers import run_python, tiny_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e \".[aot]\"); the TPU "
    "ahead-of-time compilation tests need it")


def _stacked_copy(unrolled, scanned_cfg):
  """A scan_layers model holding exactly the unrolled model's weights (blocks stacked)."""
  scanned = models.build(scanned_cfg, seed=1)
  params = nnx.to_pure_dict(nnx.state(unrolled))
  blocks = [params["blocks"][i] for i in range(scanned_cfg.num_layers)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  state = nnx.state(scanned)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(scanned, state)
  return scanned


def test_scanned_layers_give_the_unrolled_model():
  cfg = presets.get("tiny", vocab_size=50, num_layers=3, dropout=0.1,
                    time_conditioning=True)
  unrolled = models.build(cfg, seed=0)
  scanned = _stacked_copy(unrolled, cfg.replace(scan_layers=True))
  spec = nnx.get_partition_spec(nnx.state(scanned))
  assert tuple(spec["blocks"]["attn"]["w_qkv"].value)[0] == "layers"
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 51)
  noise = jnp.array([0.3, 0.7])
  key = jax.random.key(5)  # dropout on: each layer must get the unrolled model's key
  forward = nnx.jit(lambda m, t, n, k: m(t, n, dropout_key=k))
  # Equal up to float32 rounding (a loop body is compiled apart from its neighbours).
  np.testing.assert_allclose(forward(scanned, tokens, noise, key),
                             forward(unrolled, tokens, noise, key), rtol=1e-5, atol=1e-5)
  # The per-layer views (KV-cached AR decoding) are the unrolled blocks.
  for a, b in zip(scanned.layers(), unrolled.layers()):
    np.testing.assert_array_equal(a.mlp.w_out[...], b.mlp.w_out[...])


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots_saveable", True)])
def test_remat_changes_no_loss_and_no_gradient(remat, scan):
  cfg = presets.get("tiny", vocab_size=50, dropout=0.1, scan_layers=scan)
  plain, with_remat = models.build(cfg, seed=0), models.build(cfg.replace(remat=remat), seed=0)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 51)
  key = jax.random.key(3)

  @nnx.jit
  def loss_and_grad(model):
    return nnx.value_and_grad(
        lambda m: jnp.mean(jax.nn.log_softmax(m(tokens, dropout_key=key))[..., 0]))(model)

  (l0, g0), (l1, g1) = (loss_and_grad(m) for m in (plain, with_remat))
  assert float(l0) == float(l1)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g0)), jax.tree.leaves(nnx.to_pure_dict(g1))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_parameters_and_first_moment():
  cfg = presets.get("tiny", vocab_size=50, param_dtype="bfloat16")
  model = models.build(cfg, seed=0)
  reference = models.build(cfg.replace(param_dtype="float32"), seed=0)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model))}
  assert dtypes == {"bfloat16"}
  # The same draw, rounded.
  np.testing.assert_array_equal(model.embed[...], reference.embed[...].astype(jnp.bfloat16))
  opt = train.make_optimizer(config_lib.OptimConfig(mu_dtype="bfloat16"), 10)
  state = opt.init({"w": jnp.zeros((3, 4), jnp.float32)})
  adam = state[1][0]
  assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match="remat must be one of"):
    presets.get("tiny", remat="some")
  with pytest.raises(ValueError, match="mu_dtype"):
    cfg = tiny_config()
    cfg.optim.mu_dtype = "float16"
    config_lib.validate(cfg)


def test_the_local_report_is_the_trainers_compiled_step(tmp_path):
  """mdlm.aot on the local devices reports the memory of the executable the trainer runs."""
  cfg = tiny_config(steps=2)
  cfg.model = cfg.model.replace(vocab_size=259, remat="dots_saveable", scan_layers=True)
  report = aot.compile_report(config_lib.validate(cfg), aot.local_target(aot.AotSettings()))
  trainer = train.Trainer(train.prepare(config_lib.validate(cfg), RunDir(str(tmp_path / "run"))))
  batch = sharding.global_batch(next(trainer.train_iter), trainer.p.mesh)
  step = trainer.steps[cfg.objective.name if cfg.objective.name != "auto" else "diffusion"]
  compiled = step.lower(trainer.state, batch).compile()
  assert aot.memory_report(compiled) == report["memory_per_device"]
  assert report["memory_per_device"]["peak"] > 0 and report["fits"]
  assert report["state_per_device"]["params"] == 4 * presets.count_params(
      cfg.model.replace(vocab_size=259))["total"]
  assert report["xla_flops_per_device"] > 0
  assert "memory per device: peak" in aot.format_report(report)


@pytest.mark.parametrize("name, expected", [
    ("v5p-8", ("v5p", "2x2x1")), ("v5p-256", ("v5p", "4x4x8")), ("v5e-256", ("v5e", "16x16")),
    ("v4-8", ("v4", "2x2x1")), ("v6e-64", ("v6e", "8x8")), ("v5p:4x4x4", ("v5p", "4x4x4"))])
def test_tpu_names(name, expected):
  assert aot.parse_tpu_name(name) == expected


@pytest.mark.parametrize("name, match", [
    ("v7-8", "Unknown target"), ("v5p-7", "Unknown slice"), ("v5p:4x4", "3-D grid"),
    ("tpu", "Unknown target")])
def test_unknown_targets_are_refused(name, match):
  with pytest.raises(aot.AotError, match=match):
    aot.parse_tpu_name(name)


def test_missing_libtpu_names_the_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "libtpu" else real(n, *a))
  with pytest.raises(aot.AotError, match=r"pip install -e \"\.\[aot\]\""):
    aot.tpu_target("v5p-8")


def _tpu_report(preset, mesh, target="v5p-8", batch=8, seq_len=64, **model):
  cfg = tiny_config()
  cfg.model = presets.get(preset, vocab_size=512, **model)
  cfg.data = dataclasses.replace(cfg.data, seq_len=seq_len)
  cfg.train.batch_size = batch
  cfg.mesh = config_lib.MeshConfig(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return aot.compile_report(config_lib.validate(cfg), aot.tpu_target(target))


@needs_libtpu
def test_tiny_compiles_for_a_tpu_topology_under_each_mesh():
  reports = {mesh: _tpu_report("tiny", mesh) for mesh in [(4, 1, 1), (1, 4, 1), (1, 2, 2)]}
  for mesh, r in reports.items():
    assert r["devices"] == 4 and tuple(r["mesh"].values()) == mesh and r["fits"]
  # Sharding the parameters and optimizer state over fsdp divides their bytes per device.
  replicated = reports[(4, 1, 1)]["state_per_device"]
  fsdp = reports[(1, 4, 1)]["state_per_device"]
  assert fsdp["params"] < replicated["params"] / 3
  # (XLA pads small arrays to the TPU's tiles, so the arguments shrink by less than 4x.)
  assert (reports[(1, 4, 1)]["memory_per_device"]["arguments"]
          < 0.6 * reports[(4, 1, 1)]["memory_per_device"]["arguments"])


@needs_libtpu
@pytest.mark.parametrize("preset", ["tiny", pytest.param("cpu", marks=pytest.mark.slow)])
def test_memory_falls_with_remat_on_tpu(preset):
  kw = dict(batch=16, seq_len=128, scan_layers=True)
  plain = _tpu_report(preset, (1, 4, 1), **kw)
  remat = _tpu_report(preset, (1, 4, 1), remat="full", **kw)
  assert remat["memory_per_device"]["temporaries"] < 0.6 * plain["memory_per_device"]["temporaries"]
  assert plain["largest_arrays"][0]["spec"] != "PartitionSpec()"


@pytest.mark.slow
@needs_libtpu
def test_cpu_preset_compiles_for_a_tpu_topology_under_each_mesh():
  reports = {mesh: _tpu_report("cpu", mesh, batch=16, seq_len=256)
             for mesh in [(4, 1, 1), (1, 4, 1), (1, 2, 2)]}
  assert all(r["fits"] for r in reports.values())
  assert (reports[(1, 4, 1)]["memory_per_device"]["peak"]
          < reports[(4, 1, 1)]["memory_per_device"]["peak"])


@needs_libtpu
def test_a_mesh_or_batch_that_does_not_fit_the_topology_is_refused():
  with pytest.raises(ValueError, match="needs 8 devices but 4 are available"):
    _tpu_report("tiny", (8, 1, 1))
  with pytest.raises(ValueError, match="must be divisible by the data x fsdp mesh size"):
    _tpu_report("tiny", (1, 4, 1), batch=6)
  with pytest.raises(ValueError, match="multiple of 2"):
    aot.run(aot.AotConfig(mesh=config_lib.MeshConfig(data=1, fsdp=-1),
                          aot=aot.AotSettings(target="v5e-4", slices=2)))


def test_an_objective_over_trained_runs_is_refused():
  cfg = tiny_config(objective="maria")
  cfg.objective.denoiser_run, cfg.objective.ar_run = "/nonexistent/a", "/nonexistent/b"
  with pytest.raises(aot.AotError, match="objective=maria"):
    aot.lower_train_step(cfg, jax.devices())


def test_cli_refuses_an_unknown_target_before_compiling(tmp_path):
  out = tmp_path / "r.json"
  proc = run_python(["-m", "mdlm.aot", "aot.target=v9-8", f"aot.output={out}"], timeout=120)
  assert proc.returncode != 0
  assert "mdlm.aot: Unknown target 'v9-8'" in proc.stderr
  assert not out.exists()




def test_a_scanned_rematerialised_model_trains_evaluates_and_resumes(tmp_path):
  cfg = tiny_config(steps=4, eval_every=4, checkpoint_every=2)
  cfg.model = cfg.model.replace(scan_layers=True, remat="dots_saveable")
  run_dir = train.run(cfg, str(tmp_path / "run"))
  status = RunDir(run_dir).read_status()
  assert status["state"] == "finished" and status["checkpoint"] == 4
  assert np.isfinite(status["val/nll"])
  cfg.train.steps = 6  # resume from step 4 (remat may change between starts; the layout may not)
  cfg.model = cfg.model.replace(remat="full")
  train.run(cfg, run_dir)
  assert RunDir(run_dir).read_status()["step"] == 6
  cfg.model = cfg.model.replace(scan_layers=False)
  cfg.train.steps = 8
  with pytest.raises(train.TrainingError, match="scan_layers"):
    train.run(cfg, run_dir)
