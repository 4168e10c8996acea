"""Training-step benchmark: throughput (tokens/s), MFU and peak memory of the MDLM denoiser.

One training step is what the trainer runs: sample t, mask, denoise, the Rao-Blackwellized NELBO
(mdlm.diffusion.diffusion_loss), value_and_grad, global-norm clipping and an optax AdamW update,
jitted with the parameters and optimizer state donated.

MFU = FLOPs/token x tokens/s / peak, where FLOPs/token is presets.flops_per_token(...)["full"]
(6 x matmul parameters, output head included, + 12 x layers x L x d for attention) and the peak
is measured here: a jitted 2048x2048 matmul in float32 (median of repeats). bfloat16 runs are
quoted against the same float32 peak (column "mfu") and against a bf16-input matmul peak
("mfu_bf16").

Timings on a shared CPU are noisy: each figure is the median of `--repeats` timed steps after
`--warmup` untimed ones, and the matmul peak is measured before and after the steps (the median
of all its samples is used).

  python experiments/bench_train.py                        # tiny and cpu presets, float32
  python experiments/bench_train.py --presets cpu --dtypes float32 bfloat16
  python experiments/bench_train.py --presets small --seq-len 1024 --batch 8 --dtypes bfloat16
  python experiments/bench_train.py --json out.json        # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdlm import diffusion
from mdlm import schedules
from mdlm.models import build, presets


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 20) -> list[float]:
  """FLOP/s samples of a jitted size x size matmul (bf16 inputs accumulate in float32)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (size, size), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  for _ in range(3):
    f(a, b).block_until_ready()
  _, times = _median_time(lambda: f(a, b), repeats)
  return [2.0 * size**3 / t for t in times]


def make_train_step(model, schedule, *, lr=3e-4, weight_decay=0.01, clip=1.0):
  """(graphdef, params, opt_state, step_fn): step_fn(params, opt_state, key, tokens)."""
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=weight_decay))
  opt_state = tx.init(params)
  mask_id = model.mask_id

  def loss_fn(params, key, tokens_BxL):
    net = nnx.merge(graphdef, params)
    apply_fn = lambda xt, t: net(xt, schedule.mask_prob(t))
    per_token_BxL, _, _ = diffusion.diffusion_loss(key, apply_fn, tokens_BxL, schedule, mask_id)
    return jnp.sum(per_token_BxL) / tokens_BxL.size

  def step(params, opt_state, key, tokens_BxL):
    loss, grads = jax.value_and_grad(loss_fn)(params, key, tokens_BxL)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  return graphdef, params, opt_state, jax.jit(step, donate_argnums=(0, 1))


def bench_one(preset: str, dtype: str, *, seq_len: int, batch: int, vocab: int, warmup: int,
              repeats: int, seed: int = 0) -> dict:
  cfg = presets.get(preset, dtype=dtype, vocab_size=vocab,
                    max_seq_len=max(seq_len, presets.PRESETS[preset].max_seq_len))
  model = build(cfg, seed=seed)
  schedule = schedules.get("loglinear")
  _, params, opt_state, step = make_train_step(model, schedule)
  del model
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len), 0, vocab, jnp.int32)
  key = jax.random.key(seed + 2)

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, key, tokens).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  losses = []
  def run():
    nonlocal params, opt_state
    params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, len(losses)),
                                       tokens)
    losses.append(loss)
    return loss

  for _ in range(warmup):
    run()
  jax.block_until_ready(losses[-1]) if losses else None
  step_s, times = _median_time(run, repeats)
  loss_vals = [float(l) for l in losses]
  if not np.all(np.isfinite(loss_vals)):
    raise RuntimeError(f"non-finite loss in the benchmark: {loss_vals}")

  flops = presets.flops_per_token(cfg, seq_len, vocab)
  tokens_per_step = batch * seq_len
  peak_bytes = None
  if mem is not None:
    peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return {
      "preset": preset, "dtype": dtype, "seq_len": seq_len, "batch": batch, "vocab": vocab,
      "params": presets.count_params(cfg, vocab)["total"],
      "flops_per_token": flops["full"],
      "xla_flops_per_token": (cost or {}).get("flops", float("nan")) / tokens_per_step,
      "step_s": step_s, "step_s_all": times,
      "tokens_per_s": tokens_per_step / step_s,
      "achieved_flops": flops["full"] * tokens_per_step / step_s,
      "compile_s": compile_s,
      "xla_temp_mib": None if mem is None else mem.temp_size_in_bytes / 2**20,
      "xla_peak_mib": None if peak_bytes is None else peak_bytes / 2**20,
      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "loss_first": loss_vals[0], "loss_last": loss_vals[-1],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
  p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--peak-repeats", type=int, default=20)
  p.add_argument("--json", default=None, help="write the result rows to this JSON file")
  args = p.parse_args(argv)
  for name in args.presets:
    presets.get(name)  # unknown names fail before anything compiles
  if min(args.seq_len, args.batch, args.vocab, args.repeats) < 1 or args.warmup < 0:
    p.error("--seq-len, --batch, --vocab and --repeats must be >= 1, --warmup >= 0")

  dev = jax.devices()[0]
  print(f"# jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '')}), "
        f"{platform.processor() or platform.machine()}; L={args.seq_len} batch={args.batch} "
        f"V={args.vocab}; median of {args.repeats} steps after {args.warmup} warm-up")
  peak_samples = {"float32": matmul_peak("float32", repeats=args.peak_repeats)}
  if "bfloat16" in args.dtypes:
    peak_samples["bfloat16"] = matmul_peak("bfloat16", repeats=args.peak_repeats)

  rows = []
  for name in args.presets:
    for dtype in args.dtypes:
      rows.append(bench_one(name, dtype, seq_len=args.seq_len, batch=args.batch, vocab=args.vocab,
                            warmup=args.warmup, repeats=args.repeats))
      print(f"#   done {name}/{dtype}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr)
  # Measure the peak again after the steps: on a shared machine, load drifts.
  peak_samples["float32"] += matmul_peak("float32", repeats=args.peak_repeats)
  peaks = {k: statistics.median(v) for k, v in peak_samples.items()}
  print(f"# matmul peak 2048^2 (median): float32 {peaks['float32'] / 1e9:.1f} GFLOP/s"
        + (f", bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s" if "bfloat16" in peaks else ""))
  header = (f"{'preset':8s} {'dtype':8s} {'params':>9s} {'GFLOP/tok':>9s} {'s/step':>7s} "
            f"{'tok/s':>8s} {'GFLOP/s':>8s} {'MFU':>6s} {'MFUbf16':>7s} {'XLApeak':>8s} "
            f"{'maxRSS':>8s} {'compile':>7s}")
  print(header)
  for r in rows:
    r["peak_flops_f32"] = peaks["float32"]
    r["mfu"] = r["achieved_flops"] / peaks["float32"]
    r["mfu_bf16"] = (r["achieved_flops"] / peaks["bfloat16"]
                     if r["dtype"] == "bfloat16" and "bfloat16" in peaks else None)
    mfu_bf16 = f"{100 * r['mfu_bf16']:6.1f}%" if r["mfu_bf16"] is not None else "      -"
    print(f"{r['preset']:8s} {r['dtype']:8s} {r['params'] / 1e6:8.2f}M "
          f"{r['flops_per_token'] / 1e9:9.4f} {r['step_s']:7.3f} {r['tokens_per_s']:8.0f} "
          f"{r['achieved_flops'] / 1e9:8.1f} {100 * r['mfu']:5.1f}% {mfu_bf16} "
          f"{r['xla_peak_mib']:7.0f}M {r['maxrss_mib']:7.0f}M {r['compile_s']:6.1f}s")
  print("# MFU against the float32 peak; MFUbf16 against the bf16-input peak. XLApeak = "
        "arguments + outputs + temporaries - aliased (compiled.memory_analysis); maxRSS = "
        "process high-water mark so far.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peaks": peaks, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
