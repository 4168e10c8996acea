"""Training-step benchmark: throughput (tokens/s), MFU and peak memory of the MDLM denoiser.

One training step is what the trainer runs: sample t, mask, denoise, the Rao-Blackwellized NELBO
(mdlm.diffusion.diffusion_loss), value_and_grad, global-norm clipping and an optax AdamW update,
jitted with the parameters and optimizer state donated (nnx.split once, nnx.merge in the step).

MFU = FLOPs/token x tokens/s / peak. FLOPs/token is presets.flops_per_token(...)["full"]
(6 x matmul parameters, output head included, + 12 x layers x L x d for attention). The peak is
measured in this script: a jitted 2048x2048 float32 matmul, the median of samples taken between
the timed training steps (so both see the same machine load). bfloat16 rows are also quoted
against a bf16-input matmul peak
(column MFUbf16); on a GPU or TPU the bf16 column uses the vendor's dense bf16 peak instead
(mdlm.perf), since a 2048^2 matmul does not saturate an accelerator.

The CPU is shared on the development machines, so the script also reports process CPU seconds
per step and MFUcpu = FLOPs per CPU-second of the step / FLOPs per CPU-second of the matmul.
Other processes inflate wall-clock times but hardly CPU time; MFUcpu equals MFU when the step
keeps every core busy, so MFU / MFUcpu is the step's parallel efficiency.

  python experiments/bench_train.py                        # tiny and cpu presets, float32
  python experiments/bench_train.py --presets cpu --dtypes float32 bfloat16
  python experiments/bench_train.py --presets small --seq-len 1024 --batch 32 --vocab 50257 \
      --dtypes bfloat16 --attention-impl cudnn             # on a GPU
  python experiments/bench_train.py --json out.json        # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import mdlm  # first: its host-malloc settings (mdlm.host_malloc) must precede jax's threads
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdlm import diffusion
from mdlm import perf
from mdlm import schedules
from mdlm.models import build, presets


def _time(fn, repeats):
  """Wall-clock and process CPU seconds of each of `repeats` calls."""
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return wall, cpu


class MatmulPeak:
  """Samples the FLOP/s (and FLOP per CPU-second) of a jitted size x size matmul.

  bf16 inputs accumulate in float32. Each sample times `calls` back-to-back matmuls.
  """

  def __init__(self, dtype: str = "float32", size: int = 2048, calls: int = 4):
    k1, k2 = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(k1, (size, size), jnp.float32).astype(dtype)
    self.b = jax.random.normal(k2, (size, size), jnp.float32).astype(dtype)
    self.f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    self.flops, self.calls = calls * 2.0 * size**3, calls
    for _ in range(3):
      self.f(self.a, self.b).block_until_ready()

  def sample(self, repeats: int = 1):
    """([FLOP/s], [FLOP per CPU-second]), one entry per repeat."""
    wall, cpu = _time(lambda: [self.f(self.a, self.b) for _ in range(self.calls)], repeats)
    return [self.flops / t for t in wall], [self.flops / t for t in cpu]


def make_train_step(model, schedule, *, lr=3e-4, weight_decay=0.01, clip=1.0):
  """(params, opt_state, step): step(params, opt_state, key, tokens) -> (params, opt_state, loss)."""
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=weight_decay))
  opt_state = tx.init(params)
  mask_id, use_dropout = model.mask_id, model.cfg.dropout > 0

  def loss_fn(params, key, tokens_BxL):
    net = nnx.merge(graphdef, params)
    loss_key, dropout_key = jax.random.split(key)
    apply_fn = lambda xt, t: net(xt, schedule.mask_prob(t),
                                 dropout_key=dropout_key if use_dropout else None)
    per_token_BxL, _, _ = diffusion.diffusion_loss(loss_key, apply_fn, tokens_BxL, schedule,
                                                   mask_id)
    return jnp.sum(per_token_BxL) / tokens_BxL.size

  def step(params, opt_state, key, tokens_BxL):
    loss, grads = jax.value_and_grad(loss_fn)(params, key, tokens_BxL)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return params, opt_state, jax.jit(step, donate_argnums=(0, 1))


def bench_one(preset: str, dtype: str, *, seq_len: int, batch: int, vocab: int, warmup: int,
              repeats: int, peak_fn, attention_impl=None, time_conditioning=False,
              seed: int = 0) -> dict:
  """Times `repeats` training steps; peak_fn() -> (FLOP/s samples, FLOP/CPU-s samples)."""
  cfg = presets.get(preset, dtype=dtype, vocab_size=vocab, attention_impl=attention_impl,
                    time_conditioning=time_conditioning,
                    max_seq_len=max(seq_len, presets.PRESETS[preset].max_seq_len))
  params, opt_state, step = make_train_step(build(cfg, seed=seed), schedules.get("loglinear"))
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len), 0, vocab, jnp.int32)
  key = jax.random.key(seed + 2)

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, key, tokens).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()

  losses = []
  def run():
    nonlocal params, opt_state
    params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, len(losses)),
                                       tokens)
    losses.append(loss)
    return loss

  for _ in range(warmup):
    jax.block_until_ready(run())
  # Steps alternate with samples of the matmul peak, so that both see the same machine load.
  wall, cpu, peak_wall, peak_cpu = [], [], [], []
  for _ in range(repeats):
    w, c = _time(run, 1)
    wall += w
    cpu += c
    w, c = peak_fn()
    peak_wall += w
    peak_cpu += c
  loss_vals = [float(l) for l in losses]
  if not np.all(np.isfinite(loss_vals)):
    raise RuntimeError(f"non-finite loss in the benchmark: {loss_vals}")

  flops_per_token = presets.flops_per_token(cfg, seq_len, vocab)["full"]
  step_s, tokens_per_step = statistics.median(wall), batch * seq_len
  xla_peak = None
  if mem is not None:
    xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
  device_stats = jax.devices()[0].memory_stats() or {}
  return {
      "preset": preset, "dtype": dtype, "seq_len": seq_len, "batch": batch, "vocab": vocab,
      "attention_impl": attention_impl, "time_conditioning": time_conditioning,
      "host_malloc": mdlm.host_malloc.applied,
      "params": presets.count_params(cfg, vocab)["total"],
      "flops_per_token": flops_per_token,
      "step_s": step_s, "step_s_all": wall,
      "cpu_s": statistics.median(cpu), "cpu_s_all": cpu,
      "peak_flops": statistics.median(peak_wall), "peak_flops_per_cpu_s": statistics.median(peak_cpu),
      "tokens_per_s": tokens_per_step / step_s,
      "achieved_flops": flops_per_token * tokens_per_step / step_s,
      "compile_s": compile_s,
      "xla_peak_mib": None if xla_peak is None else xla_peak / 2**20,
      "device_peak_mib": device_stats.get("peak_bytes_in_use", 0) / 2**20 or None,
      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "loss_first": loss_vals[0], "loss_last": loss_vals[-1],
  }


def _fmt_pct(x):
  return "     -" if x is None else f"{100 * x:5.1f}%"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
  p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--peak-repeats", type=int, default=10)
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"],
                 help="jax.nn.dot_product_attention implementation (default: JAX's choice)")
  p.add_argument("--time-conditioning", action="store_true",
                 help="adaLN-zero time conditioning, as MDLM's DiT (off in the presets)")
  p.add_argument("--json", default=None, help="write the result rows to this JSON file")
  args = p.parse_args(argv)
  for name in args.presets:
    presets.get(name)  # unknown names fail before anything compiles
  if min(args.seq_len, args.batch, args.vocab, args.repeats, args.peak_repeats) < 1:
    p.error("--seq-len, --batch, --vocab, --repeats and --peak-repeats must be >= 1")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")

  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  print(f"# jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{platform.machine()} x {os.cpu_count()} CPUs; L={args.seq_len} batch={args.batch} "
        f"V={args.vocab}; medians of {args.repeats} steps after {args.warmup} warm-up",
        flush=True)
  f32_peak = MatmulPeak("float32")
  bf16_peak = None
  if "bfloat16" in args.dtypes:
    if on_cpu:
      bf16_peak = statistics.median(MatmulPeak("bfloat16").sample(args.peak_repeats)[0])
    else:  # a 2048^2 matmul does not saturate an accelerator: use the vendor's figure
      bf16_peak = perf.device_peak_flops("bfloat16") / len(jax.devices())

  rows = []
  for name in args.presets:
    for dtype in args.dtypes:
      r = bench_one(name, dtype, seq_len=args.seq_len, batch=args.batch, vocab=args.vocab,
                    warmup=args.warmup, repeats=args.repeats, attention_impl=args.attention_impl,
                    time_conditioning=args.time_conditioning,
                    peak_fn=lambda: f32_peak.sample(max(1, args.peak_repeats // args.repeats)))
      work = r["flops_per_token"] * r["batch"] * r["seq_len"]
      r["mfu"] = r["achieved_flops"] / r["peak_flops"]
      r["mfu_bf16"] = r["achieved_flops"] / bf16_peak if dtype == "bfloat16" else None
      r["mfu_cpu"] = work / r["cpu_s"] / r["peak_flops_per_cpu_s"] if on_cpu else None
      rows.append(r)
      print(f"#   {name}/{dtype}: {r['step_s']:.3f} s/step", flush=True)

  print(f"# peak: float32 2048^2 matmul "
        + ", ".join(f"{r['peak_flops'] / 1e9:.0f}" for r in rows) + " GFLOP/s during each row"
        + (f"; bf16 {'matmul' if on_cpu else 'vendor'} {bf16_peak / 1e9:.0f} GFLOP/s"
           if bf16_peak else "")
        + f"; load average {os.getloadavg()[0]:.1f}")
  print(f"{'preset':7s} {'dtype':8s} {'params':>8s} {'GF/tok':>7s} {'s/step':>7s} {'tok/s':>8s} "
        f"{'GFLOP/s':>8s} {'MFU':>6s} {'MFUbf16':>7s} {'cpu-s':>6s} {'MFUcpu':>6s} "
        f"{'XLAmem':>7s} {'devpeak':>7s} {'maxRSS':>7s} {'compile':>7s}")
  mib = lambda x: "      -" if x is None else f"{x:6.0f}M"
  for r in rows:
    print(f"{r['preset']:7s} {r['dtype']:8s} {r['params'] / 1e6:7.2f}M "
          f"{r['flops_per_token'] / 1e9:7.4f} {r['step_s']:7.3f} {r['tokens_per_s']:8.0f} "
          f"{r['achieved_flops'] / 1e9:8.1f} {_fmt_pct(r['mfu'])} {_fmt_pct(r['mfu_bf16']):>7s} "
          f"{r['cpu_s']:6.2f} {_fmt_pct(r['mfu_cpu'])} {mib(r['xla_peak_mib'])} "
          f"{mib(r['device_peak_mib'])} {mib(r['maxrss_mib'])} {r['compile_s']:6.1f}s")
  print("# MFU: against the float32 matmul peak sampled between the steps. MFUbf16: against the "
        "bf16 peak. cpu-s: process CPU seconds per step. MFUcpu: FLOPs per CPU-second against "
        "the float32 matmul's. XLAmem: arguments + outputs + temporaries - donated "
        "(compiled.memory_analysis); devpeak: the device allocator's peak (accelerators); "
        "maxRSS: process high-water mark.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"bf16_peak": bf16_peak, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
