"""The ahead-of-time table: which model fits which TPU slice, and what memory it plans.

Compiles the real train step (`python -m mdlm.aot`, one process per cell) for the small, medium,
1b and 8b presets on v5p-8, v5p-64, v5p-256 and v5e-256, under an FSDP mesh and an FSDP x tensor
(4) mesh, and writes experiments/aot/results/<cell>.json and experiments/aot/results.md. Every
cell uses the settings a run of that size would: bf16 compute, full rematerialisation, scanned
layers, 2 sequences per chip (8 for small/medium, whose sequences are 4x shorter). A second table
varies one lever at a time for 8b on v5p-256 (FSDP). Finished cells are skipped on a re-run.

  python experiments/aot/run.py [--only 8b] [--levers-only]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")

GPT2_VOCAB, LLADA_VOCAB = 50_257, 126_464
MODELS = {  # name: (vocab_size, seq_len, sequences per chip)
    "small": (GPT2_VOCAB, 1024, 8), "medium": (GPT2_VOCAB, 1024, 8),
    "1b": (LLADA_VOCAB - 1, 4096, 2), "8b": (LLADA_VOCAB - 1, 4096, 2),
}
TARGETS = {"v5p-8": 4, "v5p-64": 32, "v5p-256": 128, "v5e-256": 256}  # chips
MESHES = {"fsdp": lambda n: (1, n, 1), "fsdp+tensor": lambda n: (1, n // 4, 4)}
BASE = {"model.dtype": "bfloat16", "model.remat": "full", "model.scan_layers": "true"}
LEVERS = {  # 8b on v5p-256, FSDP: one setting changed from BASE
    "base (remat full, scan)": {},
    "remat none": {"model.remat": "none"},
    "remat dots_saveable": {"model.remat": "dots_saveable"},
    "unrolled layers": {"model.scan_layers": "false"},
    "bf16 AdamW first moment": {"optim.mu_dtype": "bfloat16"},
    "bf16 parameters": {"model.param_dtype": "bfloat16"},
    "8 sequences per chip": {"train.batch_size": "1024"},
}


def cell(model, target, mesh_name, extra=None, tag=None):
  vocab, seq_len, per_chip = MODELS[model]
  chips = TARGETS[target]
  data, fsdp, tensor = MESHES[mesh_name](chips)
  overrides = dict(BASE, **{"model.vocab_size": vocab, "data.seq_len": seq_len,
                            "train.batch_size": chips * per_chip, "mesh.data": data,
                            "mesh.fsdp": fsdp, "mesh.tensor": tensor})
  overrides.update(extra or {})
  name = f"{model}_{target}_{mesh_name}" + (f"_{tag}" if tag else "")
  return name, [f"model={model}", f"aot.target={target}"] + [f"{k}={v}" for k, v in
                                                            overrides.items()]


def compile_cell(name, args):
  out = os.path.join(RESULTS, name.replace(" ", "-").replace("+", "-") + ".json")
  if os.path.exists(out):
    return json.load(open(out))
  t0 = time.time()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "mdlm.aot", *args, f"aot.output={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
  if proc.returncode:
    print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None
  print(f"{name}: {time.time() - t0:.0f} s\n{proc.stdout}", flush=True)
  return json.load(open(out))


def gib(x):
  return "-" if x is None else f"{x / 2 ** 30:.2f}"


def row(label, r):
  mem, state = r["memory_per_device"], r["state_per_device"]
  fits = "yes" if r["fits"] else "**no**"
  step = r["predicted_step_seconds"]
  return (f"| {label} | {r['devices']} | {r['mesh']['data']}x{r['mesh']['fsdp']}x"
          f"{r['mesh']['tensor']} | {r['batch_size']}x{r['seq_len']} | "
          f"{gib(state['params'] + state['opt_state'] + state['ema'])} | "
          f"{gib(mem['temporaries'])} | {gib(mem['peak'])} | {gib(r['hbm_per_device'])} | {fits} | "
          f"{r['compile_seconds']:.0f} | {step:.2f} |")


HEADER = ("| {first} | devices | mesh (d x f x t) | batch | state GiB | temporaries GiB | "
          "peak GiB | HBM GiB | fits | compile s | step s at 40% MFU |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default="", help="comma-separated models")
  ap.add_argument("--levers-only", action="store_true")
  args = ap.parse_args()
  os.makedirs(RESULTS, exist_ok=True)
  models = [m for m in MODELS if not args.only or m in args.only.split(",")]
  rows = []
  if not args.levers_only:
    for model in models:
      for target in TARGETS:
        for mesh in MESHES:
          name, cli = cell(model, target, mesh)
          r = compile_cell(name, cli)
          if r is not None:
            rows.append(row(f"{model} on {target}, {mesh}", r))
  lever_rows = []
  for label, extra in LEVERS.items():
    tag = "lever-" + label if extra else None  # the base setting is the main table's cell
    name, cli = cell("8b", "v5p-256", "fsdp", extra, tag=tag)
    r = compile_cell(name, cli)
    if r is not None:
      lever_rows.append(row(label, r))
  load = os.getloadavg()
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("# Ahead-of-time compilation: memory per device and compile time\n\n"
            "`python experiments/aot/run.py` (one `python -m mdlm.aot` per cell, libtpu "
            "compile-only TPU clients on a 2-core CPU; load average when this file was written "
            f"{load[0]:.2f}, and compile times vary with the load: see experiments/README.md). "
            "bf16 compute, float32 parameters and AdamW state, remat=full, "
            "scanned layers, MDLM objective. State = parameters + AdamW + EMA per device. "
            "Peak = arguments + outputs - donated + temporaries + code, as XLA plans it. The "
            "step time assumes 40% MFU of the chip's bf16 peak for the model's FLOPs "
            "(6 N_matmul + attention per token).\n\n")
    f.write(HEADER.format(first="model, slice, mesh") + "\n" + "\n".join(rows) + "\n\n")
    f.write("## One lever at a time: 8b on v5p-256 (128 chips), FSDP, 2 x 4096 tokens per "
            "chip\n\n" + HEADER.format(first="setting") + "\n" + "\n".join(lever_rows) + "\n")


if __name__ == "__main__":
  main()
