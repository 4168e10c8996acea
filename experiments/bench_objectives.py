"""Training-step time of every objective and masking preset, relative to MDLM's, on one model.

Each row is the trainer's own jitted step (mdlm.train.make_train_step: the objective's draw over
the global batch, value_and_grad, clipping, AdamW, EMA) built from the preset's config. Rounds are
interleaved (one timed block of steps per objective, round after round) so that a change in the
machine's load hits every row alike, and each round starts one preset later so that none always
runs first. The table gives the median step time; the median over rounds of its ratio to the
MDLM step of the same round; XLA's FLOP count of the step against MDLM's (free of timing noise);
and the objective's corruption draw timed alone (jitted), which bounds what the objective itself
adds to a step whatever the machine's noise.

  python experiments/bench_objectives.py                       # the default run's model
  python experiments/bench_objectives.py --model tiny --rounds 5 --json out.json
  # what BD3-LM's clipping search adds to a step that runs it (every step, one batch):
  python experiments/bench_objectives.py --presets 'bd3lm_b16,bd3lm_b16|objective.clip_search=true|objective.clip_search_every=1|objective.clip_search_batches=1'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import mdlm  # noqa: E402,F401 (first: its host-malloc settings must precede jax's threads)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from mdlm import config as config_lib  # noqa: E402
from mdlm import objectives, perf, sharding, train  # noqa: E402
from mdlm.models import presets  # noqa: E402

PRESETS = ["default", "mdlm_is", "mlm15", "mlm40", "mlm80", "mlm15_bert", "mlm40_span", "upmlm",
           "mrd_linear", "mrd_cosine", "ptw", "ar_default", "meap", "antlm:ar",
           "antlm:diffusion"]


def _config(preset: str, model: str, vocab: int):
  """The preset's config; `model` names another size (its layers, width and heads replace the
  preset's, the kind stays the preset's). `preset` is an experiment name, optionally with
  ":<phase objective>" and "|"-separated Hydra overrides (bd3lm_b16|objective.clip_search=true)."""
  preset, *overrides = preset.split("|")
  name, _, phase = preset.partition(":")
  sizes = []
  if model != "default":
    m = presets.get(model)
    sizes = [f"model.num_layers={m.num_layers}", f"model.d_model={m.d_model}",
             f"model.num_heads={m.num_heads}", f"model.max_seq_len={m.max_seq_len}"]
  with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
    cfg = config_lib.to_config(compose("config",
                                       overrides=[f"experiment={name}"] + sizes + overrides))
  settings = objectives.settings_for(cfg, phase) if phase else cfg.objective
  return cfg, settings, cfg.model.replace(vocab_size=vocab)


def build_step(preset: str, model: str, vocab: int):
  cfg, settings, model_cfg = _config(preset, model, vocab)
  mesh, rules = train.make_mesh(cfg)
  spec = train.model_spec(model_cfg, mesh, rules)
  classes = np.arange(vocab) % cfg.masking.num_classes
  setup = objectives.make_setup(cfg, vocab, None, classes)
  objective = objectives.build(settings, setup)
  tx = train.make_optimizer(cfg.optim, cfg.train.steps)
  obj_state = {objective.name: objective.init_state()} if objective.stateful else None
  state, shardings = train.init_state(spec, tx, 0, mesh, objective_state=obj_state)
  step = train.make_train_step(spec, tx, objective, cfg.optim.ema, cfg.optim.grad_accum,
                               shardings, mesh, train.lr_schedule(cfg.optim, cfg.train.steps))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(3, vocab, (cfg.train.batch_size, cfg.data.seq_len),
                                  dtype=np.int32),
           "token_mask": np.ones((cfg.train.batch_size, cfg.data.seq_len), bool)}
  batch = sharding.global_batch(batch, mesh)
  draw_state = obj_state[objective.name] if obj_state else None
  draw = jax.jit(lambda b, key: objective.draw(b, key, cfg.train.steps // 2, draw_state))
  return step, state, batch, draw


def _compiled_flops(step, state, batch) -> float:
  """XLA's FLOP count of the lowered step: a noise-free measure of the work an objective adds
  (0 where the backend does not report it)."""
  cost = step.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="default", help="model preset (default: the default run's)")
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round and preset")
  p.add_argument("--json")
  args = p.parse_args(argv)
  config_lib.register_configs()
  names = args.presets.split(",")
  steps, states, batches, draws = {}, {}, {}, {}
  for name in names:
    steps[name], states[name], batches[name], draws[name] = build_step(name, args.model,
                                                                       args.vocab)
    for _ in range(2):  # compile and warm up
      states[name], m = steps[name](states[name], batches[name])
    jax.block_until_ready(m)
  times = {n: [] for n in names}
  for r in range(args.rounds):
    # Each round starts one preset later, so no preset always runs first (or last) in a round;
    # each block's first step is untimed (it brings that preset's state back into cache).
    for name in names[r % len(names):] + names[:r % len(names)]:
      states[name], m = steps[name](states[name], batches[name])
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for _ in range(args.steps):
        states[name], m = steps[name](states[name], batches[name])
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - t0) / args.steps)
  base = names[0]
  flops = {n: _compiled_flops(steps[n], states[n], batches[n]) for n in names}
  rows = [{"preset": n, "step_ms": 1e3 * statistics.median(times[n]),
           # paired: this preset's time over the first preset's in the same round
           "ratio": statistics.median(a / b for a, b in zip(times[n], times[base])),
           "flops_ratio": flops[n] / flops[base] if flops[base] else None,
           "draw_ms": 1e3 * perf.median_seconds(draws[n], batches[n], jax.random.key(0),
                                                 repeats=50)} for n in names]
  load = os.getloadavg()
  print(f"model={args.model} V={args.vocab}; {args.rounds} interleaved rounds of {args.steps} "
        f"steps; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  print(f"| preset | step (ms, median) | vs {base} (median of per-round ratios) | "
        f"step FLOPs (XLA) vs {base} | corruption draw alone (ms) |\n|---|---|---|---|---|")
  for r in rows:
    fr = "n/a" if r["flops_ratio"] is None else f"{r['flops_ratio']:.4f}"
    print(f"| {r['preset']} | {r['step_ms']:.1f} | {r['ratio']:.3f} | {fr} | "
          f"{r['draw_ms']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "vocab": args.vocab, "load_average": load, "rows": rows},
                f, indent=1)


if __name__ == "__main__":
  main()
