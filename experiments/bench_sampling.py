"""Sampler throughput: ancestral (uncached / cached) and confidence-based, against a bare forward.

  python experiments/bench_sampling.py [--preset tiny] [--vocab 4096] [--length 128]
      [--batches 1 8] [--multipliers 1 4 10] [--repeats 3] [--out results.json]
      [--model num_layers=4 d_model=256 num_heads=4]   # preset overrides (the default run's size)

For every batch size B and T = m L (m in --multipliers) it times, after a warm-up compile, one
sampler call on B all-mask sequences of length L (median over --repeats), and reports samples/s,
tokens/s, the NFE, the time per NFE and its overhead over one bare jitted forward pass of the
same batch (all V logits at all L positions). The samplers run the model's output head only at
the positions they fill (mdlm.sampling.denoisers.stages), so the "trunk" column, the forward pass
without the output head, is the floor of a sampler's time per NFE. Throughput columns are wall-clock medians. On a CPU backend the overhead is measured
in CPU time of this process (time.process_time), which other users' load on a shared machine
barely changes; on an accelerator in wall time:
the median over repeats of (sampler CPU time / NFE) / (bare forward CPU time), with the bare
forward timed right before the sampler in each repeat (`denoise(x, t)` alone, timed as 20 passes in one compiled loop so that call
dispatch is excluded as it is inside a sampler; also a median). The ratio uncached / cached at T = 10 L is
the cache speed-up. All timings of a run share the machine state; compare ratios within a run.
Weights are random (throughput does not depend on them), the model is not time-conditioned.
"""

from __future__ import annotations

import argparse
import json
import time

import mdlm  # noqa: F401 (first: its host-malloc settings must precede jax's threads)
import jax
import jax.numpy as jnp
import numpy as np

from mdlm import schedules
from mdlm.models import build, presets
from mdlm.sampling import ancestral, confidence, denoiser_from_model, denoisers


def _forward_loop(denoise, x_BxL, t_B, count, trunk_only=False):
  """`count` forward passes in one compiled loop (no per-call dispatch, as inside a sampler).

  Each pass's input depends on all of the previous output (a select on a NaN test of its sum that
  never fires), so the passes stay sequential, none can be hoisted out of the loop and no part of
  the output can be skipped. The sum is one read of the output, as any sampler needs at least.
  trunk_only: the hidden states only, without the output head."""
  forward = denoisers.stages(denoise)[0] if trunk_only else denoise

  def body(_, x):
    out = forward(x, t_B)
    return jnp.where(jnp.isnan(jnp.sum(out)), 0, x)
  return jax.lax.fori_loop(0, count, body, x_BxL)


def timed(fn):
  """(wall seconds, CPU seconds of this process, output) of one call."""
  t0, c0 = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, time.process_time() - c0, out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--multipliers", type=int, nargs="+", default=[1, 4, 10])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--model", nargs="*", default=[], metavar="FIELD=INT",
                 help="integer overrides of the preset, e.g. num_layers=4 d_model=256")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args()

  overrides = {}
  for item in args.model:
    field, _, value = item.partition("=")
    if not value.lstrip("-").isdigit():
      p.error(f"--model takes FIELD=INT items, got {item!r}")
    overrides[field] = int(value)
  cfg = presets.get(args.preset, vocab_size=args.vocab, dropout=0.0, dtype=args.dtype,
                    max_seq_len=max(args.length, presets.get(args.preset).max_seq_len),
                    **overrides)
  model = build(cfg, seed=0)
  denoise = denoiser_from_model(model)
  schedule = schedules.get("loglinear")
  length, mask_id = args.length, model.mask_id
  forward = jax.jit(_forward_loop, static_argnames=("count", "trunk_only"))
  device = jax.devices()[0].device_kind
  on_cpu = jax.devices()[0].platform == "cpu"
  clock = "CPU" if on_cpu else "wall"
  print(f"device: {device}; preset {args.preset} ({cfg.num_layers} layers, d={cfg.d_model}, "
        f"{cfg.num_heads} heads), "
        f"V={args.vocab}, L={length}, dtype {args.dtype}; medians of {args.repeats}")
  print(f"| B | sampler | T | NFE | s/call | samples/s | tokens/s | ms/NFE | bare fwd {clock} ms | "
        f"trunk {clock} ms | {clock} ms/NFE | overhead/NFE ({clock}) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  loop = 20
  for batch in args.batches:
    xt = jnp.full((batch, length), mask_id, jnp.int32)
    t_B = jnp.full((batch,), 0.5)
    bare_fn = lambda: forward(denoise, xt, t_B, count=loop)
    trunk_fn = lambda: forward(denoise, xt, t_B, count=loop, trunk_only=True)
    for mult in args.multipliers:
      steps = mult * length
      runs = {
          "ancestral": lambda: ancestral(jax.random.key(0), denoise, xt, steps=steps,
                                         schedule=schedule, mask_id=mask_id, cache=False),
          "cached": lambda: ancestral(jax.random.key(0), denoise, xt, steps=steps,
                                      schedule=schedule, mask_id=mask_id, cache=True),
          "confidence": lambda: confidence(jax.random.key(0), denoise, xt, steps=steps,
                                           mask_id=mask_id),
      }
      timed(bare_fn)
      timed(trunk_fn)
      nfe = {name: int(timed(fn)[2][1]["nfe"]) for name, fn in runs.items()}  # compile + NFE
      # Interleave the bare forward with every sampler in each repeat, so that load changes on a
      # shared machine hit both sides of each overhead ratio alike.
      seconds = {name: [] for name in runs}
      ratio = {name: [] for name in runs}
      bares, trunks, per_nfe = [], [], {name: [] for name in runs}
      for _ in range(args.repeats):
        for name, fn in runs.items():
          bare_wall, bare_cpu, _ = timed(bare_fn)
          trunk_wall, trunk_cpu, _ = timed(trunk_fn)
          sec, cpu, _ = timed(fn)
          # CPU time on a CPU backend; wall time on an accelerator (host CPU time is no measure).
          bare, trunk, spent = ((bare_cpu, trunk_cpu, cpu) if on_cpu
                                else (bare_wall, trunk_wall, sec))
          bares.append(bare / loop)
          trunks.append(trunk / loop)
          per_nfe[name].append(spent / max(nfe[name], 1))
          seconds[name].append(sec)
          ratio[name].append(spent / max(nfe[name], 1) / (bare / loop))
      for name in runs:
        sec = float(np.median(seconds[name]))
        row = {"device": device, "preset": args.preset, "batch": batch, "sampler": name,
               "steps": steps, "nfe": nfe[name], "seconds": sec,
               "samples_per_s": batch / sec, "tokens_per_s": batch * length / sec,
               "ms_per_nfe": 1e3 * sec / max(nfe[name], 1),
               "bare_forward_ms": 1e3 * float(np.median(bares)),
               "trunk_ms": 1e3 * float(np.median(trunks)),
               "clock_ms_per_nfe": 1e3 * float(np.median(per_nfe[name])), "clock": clock,
               "overhead_per_nfe": float(np.median(ratio[name])) - 1.0}
        rows.append(row)
        print(f"| {batch} | {name} | {mult}L={steps} | {nfe[name]} | {sec:.3f} | "
              f"{row['samples_per_s']:.2f} | {row['tokens_per_s']:.0f} | {row['ms_per_nfe']:.2f} | "
              f"{row['bare_forward_ms']:.2f} | {row['trunk_ms']:.2f} | "
              f"{row['clock_ms_per_nfe']:.2f} | {100 * row['overhead_per_nfe']:+.1f}% |", flush=True)
  print()
  for batch in args.batches:
    by = {(r["sampler"], r["steps"]): r for r in rows if r["batch"] == batch}
    for mult in args.multipliers:
      steps = mult * length
      speedup = by[("ancestral", steps)]["seconds"] / by[("cached", steps)]["seconds"]
      print(f"B={batch} T={mult}L: cached is {speedup:.1f}x faster than uncached")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
