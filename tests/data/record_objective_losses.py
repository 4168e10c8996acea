"""Records the train losses of steps 1-20 of a tiny run for each objective (diffusion, ar, meap,
maria) into objective_losses.json.

Written and run once, on the code *before* the objectives became a registry package (commit
775e86c), so that tests/test_objective_registry.py can check that the refactored objectives give
bit-identical losses. Kept for the record; it uses the configuration keys of that commit.

  PYTHONPATH=. python tests/data/record_objective_losses.py
"""

import json
import os
import platform
import subprocess
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mdlm import train  # noqa: E402
from tests.helpers import tiny_config, train_losses  # noqa: E402

STEPS = 20


def main():
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    runs = {}
    for name, objective, kind in (("diffusion", "diffusion", "denoiser"), ("ar", "ar", "ar"),
                                  ("meap", "meap", "ar")):
      cfg = tiny_config(steps=STEPS, objective=objective, eval_every=1000)
      cfg.model = cfg.model.replace(kind=kind)
      runs[name] = os.path.join(tmp, name)
      train.run(cfg, runs[name])
    cfg = tiny_config(steps=STEPS, objective="maria", eval_every=1000,
                      maria_denoiser_run=runs["diffusion"], maria_ar_run=runs["ar"])
    runs["maria"] = os.path.join(tmp, "maria")
    train.run(cfg, runs["maria"])
    for name, run_dir in runs.items():
      losses = train_losses(run_dir)
      out[name] = [losses[s] for s in range(1, STEPS + 1)]
  commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
  record = {"recorded_at_commit": commit.strip(), "jax": jax.__version__,
            "machine": platform.machine(), "steps": STEPS, "losses": out}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "objective_losses.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record, indent=1))


if __name__ == "__main__":
  main()
