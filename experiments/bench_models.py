"""Parameter counts for every preset, and forward / forward+backward time per token on this host.

  python experiments/bench_models.py [--presets tiny small] [--batch 8] [--seq-len 128]
      [--vocab 32768] [--repeats 5]

Prints one table; times are medians over `--repeats` after a warm-up, in microseconds per token.
The forward+backward step is the masked-diffusion loss and its gradient (no optimizer update).
"""

from __future__ import annotations

import argparse

import mdlm  # noqa: F401 (first: its host-malloc settings must precede jax's threads)
import jax
from flax import nnx

from mdlm import diffusion, models, perf, schedules
from mdlm.models import presets


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--presets", nargs="+", default=["tiny", "small"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()

  print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, L {args.seq_len}, "
        f"V {args.vocab}, dtype {args.dtype}")
  print("| preset | layers | d | heads | total params | non-embedding | matmul | FLOPs/token "
        "(6N / full) |")
  print("|---|---|---|---|---|---|---|---|")
  for name in presets.PRESETS:
    cfg = presets.get(name, vocab_size=args.vocab)
    c = presets.count_params(cfg)
    f = presets.flops_per_token(cfg, min(args.seq_len, cfg.max_seq_len))
    print(f"| {name} | {cfg.num_layers} | {cfg.d_model} | {cfg.num_heads} | {c['total']/1e6:.2f}M "
          f"| {c['non_embedding']/1e6:.2f}M | {c['matmul']/1e6:.2f}M | "
          f"{f['6N']/1e6:.1f}M / {f['full']/1e6:.1f}M |")

  schedule = schedules.get("loglinear")
  print("\n| preset | forward us/token | forward+backward us/token | tokens/s (fwd+bwd) |")
  print("|---|---|---|---|")
  for name in args.presets:
    cfg = presets.get(name, vocab_size=args.vocab, dropout=0.0, dtype=args.dtype)
    model = models.build(cfg)
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len), 0, args.vocab)

    @jax.jit
    def forward(state, x):
      return nnx.merge(graphdef, state)(x)

    @jax.jit
    def fwd_bwd(state, x, key):
      def loss(st):
        m = nnx.merge(graphdef, st)
        per_token, _, _ = diffusion.diffusion_loss(key, lambda xt, t: m(xt), x, schedule, args.vocab)
        return per_token.sum() / per_token.size
      return jax.value_and_grad(loss)(state)

    n_tok = args.batch * args.seq_len
    t_f = perf.median_seconds(forward, state, tokens, repeats=args.repeats)
    t_fb = perf.median_seconds(fwd_bwd, state, tokens, jax.random.key(1), repeats=args.repeats)
    print(f"| {name} | {1e6 * t_f / n_tok:.1f} | {1e6 * t_fb / n_tok:.1f} | {n_tok / t_fb:,.0f} |")


if __name__ == "__main__":
  main()
