"""Ahead-of-time compilation of the train step: `python -m mdlm.aot [overrides] aot.target=...`.

The trainer's own jitted step (`mdlm.train.make_train_step`: its in/out shardings, the donated
state, the configured objective, gradient accumulation) is lowered and compiled for a target
without running it, and without data, a tokenizer or a checkpoint:

- `aot.target=local`: the devices of this machine (the executable the trainer would run);
- a TPU slice by its Cloud name (`v5p-256`, `v5e-256`, `v4-8`, `v6e-64`), or a topology
  (`v5p:4x8x8`), with `aot.slices=N` for N slices joined over the data-center network. This
  needs `libtpu` (`pip install -e ".[aot]"`), which compiles for TPUs on any machine.

It prints, and writes as JSON (`aot.output`), the per-device memory XLA plans for the step
(arguments, outputs, temporaries, generated code, and their peak) against the chip's HBM, whether
it fits, how the largest arrays are sharded, the compile time, the FLOPs of a step, and the step
time predicted at a stated MFU (`aot.mfu`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import hydra
import jax
import numpy as np
from jax.experimental import topologies
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mdlm import cli, objectives, sharding, train
from mdlm import config as config_lib
from mdlm.data import tokenizers
from mdlm.models import presets

log = logging.getLogger("mdlm.aot")

GIB = 2 ** 30


@dataclass(frozen=True)
class Chip:
  """Public per-chip figures (Google Cloud TPU documentation): HBM and peak bf16 FLOP/s."""

  hbm_gib: float
  peak_bf16_tflops: float
  torus_dims: int           # 3: v4/v5p (3-D torus); 2: v5e/v6e
  cores_per_chip: int       # TensorCores; a Cloud slice name counts these (v5p-8 = 4 chips)


CHIPS = {
    "v4": Chip(32.0, 275.0, 3, 2),
    "v5e": Chip(16.0, 197.0, 2, 1),
    "v5p": Chip(95.0, 459.0, 3, 2),
    "v6e": Chip(32.0, 918.0, 2, 1),
}
# Chip grids of the slice shapes Cloud TPU offers, by chip count.
GRIDS = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
}
# Peak dense bf16 FLOP/s of accelerators a local target may have (vendor data sheets).
LOCAL_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


@dataclass
class AotSettings:
  """target: "local", a Cloud TPU slice ("v5p-256") or a topology ("v5p:4x8x8"). slices: TPU
  slices joined over the data-center network (the mesh's data axis spans them). mfu: the model
  FLOP utilisation the predicted step time assumes. hbm_gib / peak_tflops: per-device memory and
  peak for a local target (default: what the device reports / the table above). output: the JSON
  report (default: aot/<target>_<model>_d<data>f<fsdp>t<tensor>.json). top: largest arrays listed.
  """

  target: str = "local"
  slices: int = 1
  mfu: float = 0.4
  hbm_gib: Optional[float] = None
  peak_tflops: Optional[float] = None
  output: Optional[str] = None
  top: int = 6


@dataclass
class AotConfig(config_lib.Config):
  aot: AotSettings = field(default_factory=AotSettings)


@dataclass
class Target:
  """Devices to compile for, and what one device has."""

  name: str
  devices: list
  chips: int
  hbm_bytes_per_device: Optional[float]
  peak_flops_per_chip: Optional[float]


class AotError(ValueError):
  """A request that cannot be compiled as asked (unknown target, mesh, batch, missing libtpu)."""


# ----------------------------------------------------------------------------- targets


def parse_tpu_name(name: str) -> tuple[str, str]:
  """("v5p", "4x8x8") from "v5p-256" (Cloud's TensorCore count) or "v5p:4x8x8"."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name.strip().lower())
  if m is None:
    raise AotError(
        f"Unknown target {name!r}. Use aot.target=local, a Cloud TPU slice (v4-8, v5e-256, "
        f"v5p-256, v6e-64, ...) or a topology <chip>:<grid> (v5p:4x8x8, v5e:16x16) with chip one "
        f"of {', '.join(CHIPS)}.")
  kind, cores, grid = m.group(1), m.group(2), m.group(3)
  chip = CHIPS[kind]
  if grid is not None:
    if grid.count("x") + 1 != chip.torus_dims:
      raise AotError(f"{kind} chips form a {chip.torus_dims}-D grid; got {grid!r}.")
    return kind, grid
  cores = int(cores)
  chips, rest = divmod(cores, chip.cores_per_chip)
  grids = GRIDS[chip.torus_dims]
  if rest or chips not in grids:
    sizes = ", ".join(f"{kind}-{c * chip.cores_per_chip}" for c in grids)
    raise AotError(f"Unknown slice {name!r}; {kind} slices: {sizes} (or a grid, {kind}:"
                   f"{grids[max(grids)]}).")
  return kind, grids[chips]


def tpu_target(name: str, slices: int = 1) -> Target:
  kind, grid = parse_tpu_name(name)
  if importlib.util.find_spec("libtpu") is None:
    raise AotError(f"Compiling for {name} needs libtpu, which compiles for TPUs on any machine: "
                   "pip install -e \".[aot]\" (or: pip install libtpu).")
  if slices < 1:
    raise AotError(f"aot.slices={slices} must be >= 1.")
  # A compile-only client: without these libtpu looks for TPU hosts that a planning machine lacks
  # (and prints warnings about them), and takes a lock that lets one process at a time use it.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{CHIPS[kind].cores_per_chip}")
  topology = topologies.get_topology_desc(f"{kind}:{grid}", "tpu", num_slices=slices)
  devices = list(topology.devices)
  chips = math.prod(int(g) for g in grid.split("x")) * slices
  chip = CHIPS[kind]
  label = f"{name}" + (f" x{slices} slices" if slices > 1 else "")
  return Target(label, devices, chips, chip.hbm_gib * GIB * chips / len(devices),
                chip.peak_bf16_tflops * 1e12)


def local_target(settings: AotSettings) -> Target:
  devices = jax.devices()
  hbm = settings.hbm_gib * GIB if settings.hbm_gib else None
  if hbm is None and devices[0].platform == "cpu":  # CPU devices share the host's memory
    hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)
  elif hbm is None:
    hbm = (devices[0].memory_stats() or {}).get("bytes_limit")
  peak = settings.peak_tflops
  if peak is None:
    kind = devices[0].device_kind
    peak = next((v for k, v in LOCAL_PEAK_TFLOPS.items() if k in kind), None)
  return Target(f"local ({len(devices)} x {devices[0].device_kind})", devices, len(devices), hbm,
                peak * 1e12 if peak else None)


def make_target(settings: AotSettings) -> Target:
  if settings.target == "local":
    if settings.slices != 1:
      raise AotError("aot.slices applies to TPU targets; the local target is this machine.")
    return local_target(settings)
  return tpu_target(settings.target, settings.slices)


# ----------------------------------------------------------------------------- the step


def vocab_size(cfg: config_lib.Config) -> int:
  """V without a tokenizer: model.vocab_size, or the size the tokenizer settings fix."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  if cfg.tokenizer.kind == "sentencepiece" and not cfg.tokenizer.model_path:
    return cfg.tokenizer.vocab_size
  if cfg.tokenizer.kind == "byte":
    return tokenizers.ByteTokenizer().vocab_size
  raise AotError(f"tokenizer.kind={cfg.tokenizer.kind} takes its vocabulary from data; set "
                 "model.vocab_size=<V> to compile without it.")


def abstract_batch(cfg: config_lib.Config, mesh) -> dict:
  """The global batch the trainer feeds the step, as sharded ShapeDtypeStructs."""
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {"tokens": jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sh),
           "token_mask": jax.ShapeDtypeStruct(shape, np.bool_, sharding=batch_sh)}
  if cfg.data.meap_sft:
    batch["labels"] = jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sh)
  return batch


def lower_train_step(cfg: config_lib.Config, devices):
  """(the lowered step of the run's first objective, the abstract state, the model config, the
  mesh): the trainer's step, built the way `mdlm.train.prepare` builds it."""
  mesh, rules = train.make_mesh(cfg, devices)
  model_cfg = cfg.model.replace(vocab_size=vocab_size(cfg))
  spec = train.model_spec(model_cfg, mesh, rules)
  first = objectives.run_objectives(cfg)[0]
  if objectives.get(first.name).given_runs(first):
    raise AotError(f"objective={first.name} trains a head over trained runs, whose weights this "
                   "planner does not load; compile the backbones' own configs instead.")
  needs_classes = objectives.get(first.name).needs_token_classes(first, cfg)
  classes = np.zeros(model_cfg.vocab_size, np.int32) if needs_classes else None  # shape only
  setup = objectives.make_setup(cfg, model_cfg.vocab_size, None, classes)
  objective = objectives.build(first, setup)
  tx = train.make_optimizer(cfg.optim, cfg.train.steps)
  objective_state = {first.name: objective.init_state()} if objective.stateful else None
  state, shardings = train.abstract_state(spec, tx, mesh, objective_state)
  step = train.make_train_step(spec, tx, objective, cfg.optim.ema, cfg.optim.grad_accum,
                               shardings, mesh, train.lr_schedule(cfg.optim, cfg.train.steps))
  return step.lower(state, abstract_batch(cfg, mesh)), state, model_cfg, mesh


def _bytes_per_device(x: jax.ShapeDtypeStruct) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def largest_arrays(state, top: int) -> list[dict]:
  """The `top` largest arrays of the state: their shape, sharding and bytes per device."""
  rows = [{"name": jax.tree_util.keystr(path, simple=True, separator="/"),
           "shape": list(x.shape), "dtype": str(x.dtype), "spec": str(x.sharding.spec),
           "bytes_per_device": _bytes_per_device(x)}
          for path, x in jax.tree_util.tree_leaves_with_path(state)]
  rows.sort(key=lambda r: -r["bytes_per_device"] * 1e-9 - math.prod(r["shape"]) * 1e-18)
  return rows[:top]


def state_bytes_per_device(state) -> dict:
  """Bytes per device of each part of the state (params, opt_state, ema, ...)."""
  return {part: sum(map(_bytes_per_device, jax.tree.leaves(tree))) for part, tree in state.items()}


def memory_report(compiled) -> dict:
  """XLA's per-device memory plan of a compiled executable. peak = arguments + outputs - aliased
  (donated state reused for the new state) + temporaries + generated code."""
  m = compiled.memory_analysis()
  fields = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "generated_code": m.generated_code_size_in_bytes}
  fields["peak"] = (fields["arguments"] + fields["outputs"] - fields["aliased"]
                    + fields["temporaries"] + fields["generated_code"])
  return {k: int(v) for k, v in fields.items()}


def _out_of_memory(message: str, state) -> dict:
  """The memory figures of a step the TPU compiler refused for HBM (CompileTimeHbmOom): the
  temporaries it needed, the state's bytes, and their sum as a lower bound of the peak."""
  found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  if "RESOURCE_EXHAUSTED" not in message or found is None:
    raise AotError(f"compilation failed: {message.splitlines()[0]}")
  scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[found.group(2)]
  temporaries = int(float(found.group(1)) * scale)
  arguments = sum(state_bytes_per_device(state).values())
  return {"arguments": arguments, "outputs": None, "aliased": None, "temporaries": temporaries,
          "generated_code": None, "peak": arguments + temporaries}


def compile_report(cfg: config_lib.Config, target: Target, mfu: float = 0.4,
                   top: int = 6) -> dict:
  """Lowers and compiles the train step for `target`; returns the report (see the module doc)."""
  t0 = time.perf_counter()
  lowered, state, model_cfg, mesh = lower_train_step(cfg, target.devices)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
    memory, error = memory_report(compiled), None
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a step that cannot fit
    memory, error, cost = _out_of_memory(str(e), state), str(e).splitlines()[0], {}
  t2 = time.perf_counter()
  tokens = cfg.train.batch_size * cfg.data.seq_len
  model_flops = presets.flops_per_token(model_cfg, cfg.data.seq_len)["full"] * tokens
  counts = presets.count_params(model_cfg)
  hbm = target.hbm_bytes_per_device
  predicted = (model_flops / (target.chips * target.peak_flops_per_chip * mfu)
               if target.peak_flops_per_chip else None)
  return {
      "target": target.name, "devices": len(target.devices), "chips": target.chips,
      "mesh": dict(mesh.shape), "model": model_cfg.name, "params": counts["total"],
      "non_embedding_params": counts["non_embedding"], "batch_size": cfg.train.batch_size,
      "seq_len": cfg.data.seq_len, "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
      "mu_dtype": cfg.optim.mu_dtype, "remat": model_cfg.remat,
      "scan_layers": model_cfg.scan_layers, "grad_accum": cfg.optim.grad_accum,
      "objective": objectives.run_objectives(cfg)[0].name,
      "memory_per_device": memory, "state_per_device": state_bytes_per_device(state),
      "hbm_per_device": int(hbm) if hbm else None,
      "fits": False if error else bool(memory["peak"] <= hbm) if hbm else None,
      "compile_error": error,
      "largest_arrays": largest_arrays(state, top),
      "lower_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2),
      # XLA's cost analysis counts a loop's body once: with scan_layers or grad_accum > 1 this is
      # not the step's count (model_flops_per_step is).
      "xla_flops_per_device": float(cost.get("flops", float("nan"))),
      "model_flops_per_step": model_flops,
      "mfu": mfu, "predicted_step_seconds": predicted,
      "predicted_tokens_per_second": tokens / predicted if predicted else None,
  }


# ----------------------------------------------------------------------------- the command


def _gib(x) -> str:
  if x is None:
    return "-"
  return f"{x / GIB:,.2f} GiB" if x >= GIB / 4 else f"{x / 2 ** 20:,.1f} MiB"


def format_report(r: dict) -> str:
  mem = r["memory_per_device"]
  fits = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[r["fits"]]
  if r["compile_error"]:
    fits += f": the compiler needs at least {_gib(mem['peak'])} ({r['compile_error'][:120]})"
  lines = [
      f"{r['model']} ({r['params'] / 1e9:.3g}B parameters) on {r['target']}: {r['devices']} "
      f"devices, mesh data={r['mesh']['data']} fsdp={r['mesh']['fsdp']} "
      f"tensor={r['mesh']['tensor']}; batch {r['batch_size']} x {r['seq_len']} tokens",
      f"  memory per device: peak {_gib(mem['peak'])} of {_gib(r['hbm_per_device'])} ({fits})",
      f"    arguments {_gib(mem['arguments'])}, outputs {_gib(mem['outputs'])} (aliased "
      f"{_gib(mem['aliased'])}), temporaries {_gib(mem['temporaries'])}, code "
      f"{_gib(mem['generated_code'])}",
      "    state: " + ", ".join(f"{k} {_gib(v)}" for k, v in r["state_per_device"].items()),
      f"  compile {r['compile_seconds']:.1f} s (lowering {r['lower_seconds']:.1f} s); "
      f"{r['model_flops_per_step'] / 1e12:,.1f} model TFLOPs per step",
  ]
  if r["predicted_step_seconds"]:
    lines.append(f"  predicted at {r['mfu']:.0%} MFU: {r['predicted_step_seconds']:.3f} s per "
                 f"step, {r['predicted_tokens_per_second']:,.0f} tokens/s")
  lines.append("  largest arrays (per device):")
  lines += [f"    {a['name']:<40} {str(a['shape']):<20} {a['spec']:<32} "
            f"{_gib(a['bytes_per_device'])}" for a in r["largest_arrays"]]
  return "\n".join(lines)


def default_output(cfg: AotConfig, report: dict) -> str:
  target = re.sub(r"[^A-Za-z0-9.-]+", "-", cfg.aot.target)
  if cfg.aot.slices > 1:
    target += f"x{cfg.aot.slices}"
  m = report["mesh"]
  return os.path.join("aot", f"{target}_{report['model']}_d{m['data']}f{m['fsdp']}"
                      f"t{m['tensor']}.json")


def run(cfg: AotConfig) -> dict:
  """Checks, compiles and reports; writes the JSON report; returns it."""
  s = cfg.aot
  if not 0.0 < s.mfu <= 1.0:
    raise AotError(f"aot.mfu={s.mfu} must lie in (0, 1].")
  cfg = config_lib.validate(cfg)
  report = compile_report(cfg, make_target(s), s.mfu, s.top)
  output = s.output or default_output(cfg, report)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(report, f, indent=1)
  report["output"] = output
  return report


def register_configs() -> None:
  config_lib.register_configs()
  ConfigStore.instance().store(name="base_aot", node=AotConfig)


def _hydra_main():
  register_configs()
  cli.register_help_resolver()

  @hydra.main(version_base=None, config_path=cli.CONFIG_DIR, config_name="aot")
  def main(hydra_cfg) -> None:
    cli.setup_logging()
    try:
      report = run(OmegaConf.to_object(hydra_cfg))
    except (AotError, ValueError) as e:
      raise SystemExit(f"mdlm.aot: {e}")
    print(format_report(report))
    print(f"mdlm.aot: wrote {report['output']}", file=sys.stderr)

  main()


if __name__ == "__main__":
  _hydra_main()
