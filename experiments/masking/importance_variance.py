"""How much does importance-sampled time lower the variance of the per-batch NELBO estimate, on a
trained model? (masking.ratio=importance; mdlm.masking)

  python experiments/masking/importance_variance.py --run runs/masking/mdlm

The estimator is the training loss: one antithetic draw of t over a batch of 32 sequences, the
Rao-Blackwellized terms, divided by the batch's real tokens. For each proposal q(t) (uniform t,
the adaptive histogram after warming up on held-out batches, Beta proposals), the same held-out
batches are scored `--draws` times each; the table gives the mean estimate (it must agree across
proposals: every one is an unbiased estimate of the same NELBO integral) and the variance across
draws of the same batch, averaged over batches, with its ratio to uniform t.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import mdlm  # noqa: E402,F401 (first: its host-malloc settings must precede jax's threads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mdlm import data as data_lib  # noqa: E402
from mdlm import objectives  # noqa: E402
from mdlm.config import MaskingConfig  # noqa: E402
from mdlm.rundir import RunDir, load_run  # noqa: E402

ADAPTIVE = MaskingConfig(ratio="importance", proposal="adaptive", bins=32, history=100)
# (schedule, proposal name, masking): the trained model is not time-conditioned, so its NELBO is
# the same integral under every schedule (Shi et al. 2024, MD4, section 3); the schedule only
# changes how the Monte Carlo estimate spreads, which the importance sampler can undo.
PROPOSALS = [
    ("loglinear", "uniform t", MaskingConfig()),
    ("loglinear", "adaptive histogram", ADAPTIVE),
    ("loglinear", "Beta(0.7, 1)",
     MaskingConfig(ratio="importance", proposal="beta", beta_a=0.7, beta_b=1.0)),
    ("loglinear", "Beta(1, 0.7)",
     MaskingConfig(ratio="importance", proposal="beta", beta_a=1.0, beta_b=0.7)),
    ("linear", "uniform t", MaskingConfig()),
    ("linear", "adaptive histogram", ADAPTIVE),
]


def _batches(loaded, split, count, rows):
  ds = data_lib.build_dataset(loaded.config.data, loaded.tokenizer, split=split, batch_size=rows,
                              seed=0, cache_dir=RunDir(loaded.run_dir).data_cache_dir,
                              shuffle=True, num_epochs=1)
  out = []
  for batch in ds:
    if batch["token_mask"].all():
      out.append({k: jnp.asarray(v) for k, v in batch.items()})
    if len(out) == count:
      return out
  raise SystemExit(f"the {split} split has fewer than {count} full batches of {rows}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", default=os.path.join(REPO, "runs", "masking", "mdlm"))
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--draws", type=int, default=24)
  p.add_argument("--warmup-batches", type=int, default=120, help="to fill the histogram")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "masking"))
  args = p.parse_args(argv)
  loaded = load_run(args.run)
  graphdef, state = nnx.split(loaded.model)
  params = nnx.to_pure_dict(state)
  batches = _batches(loaded, "val", args.batches, 32)
  warm = _batches(loaded, "train", min(args.warmup_batches, 400), 32)
  rows = {}
  for schedule, proposal, masking_cfg in PROPOSALS:
    name = f"{schedule}: {proposal}"
    noise = dataclasses.replace(loaded.config.noise, schedule=schedule)
    setup = objectives.make_setup(
        dataclasses.replace(loaded.config, masking=masking_cfg, noise=noise),
        loaded.tokenizer.vocab_size, loaded.tokenizer)
    objective = objectives.build(objectives.settings_for(loaded.config, "diffusion"), setup)

    @jax.jit
    def estimate(params, batch, key, obj_state, objective=objective):
      weights = jax.tree.map(lambda x: x, state)
      nnx.replace_by_pure_dict(weights, params)
      model = nnx.merge(graphdef, weights)
      drawn = {**batch, **objective.draw(batch, key, 0, obj_state)}
      terms, _ = objective.loss(model, drawn, None)
      return jnp.sum(terms.nll_sum_B) / objective.denominator(drawn), drawn, terms

    obj_state = objective.init_state()
    if obj_state is not None:  # warm the histogram as the trainer would, on training batches
      for i, batch in enumerate(warm):
        _, drawn, terms = estimate(params, batch, jax.random.key(10_000 + i), obj_state)
        obj_state = objective.update_state(obj_state, drawn, terms, {})
    values = np.asarray([[float(estimate(params, b, jax.random.key(1000 * j + d), obj_state)[0])
                          for d in range(args.draws)] for j, b in enumerate(batches)])
    rows[name] = {"mean": float(values.mean()),
                  "mean_stderr": float(values.mean(1).std() / np.sqrt(len(batches))),
                  "variance": float(values.var(axis=1, ddof=1).mean())}
    print(name, rows[name], flush=True)
  lines = ["| schedule: proposal q(t) | mean NELBO estimate (nats/token) | variance across draws "
           "| vs uniform t |", "|---|---|---|---|"]
  for name, r in rows.items():
    r["ratio"] = r["variance"] / rows[name.split(":")[0] + ": uniform t"]["variance"]
    lines.append(f"| {name} | {r['mean']:.4f} ± {r['mean_stderr']:.4f} | {r['variance']:.5f} | "
                 f"{r['ratio']:.3f} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "importance_variance.json"), "w") as f:
    json.dump({"run": os.path.relpath(loaded.run_dir, REPO), "batches": args.batches,
               "draws": args.draws, "warmup_batches": len(warm), "rows": rows}, f, indent=1)
  with open(os.path.join(args.out, "importance_variance.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
