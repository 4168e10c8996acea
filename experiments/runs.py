"""What the experiment scripts share: the load average they quote beside each figure, and training
a run in a subprocess unless it has already finished (so that a script resumes where it stopped).

The scripts put the repository root on sys.path and import this as `experiments.runs`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mdlm.rundir import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loadavg() -> str:
  """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_unless_finished(name: str, run_dir: str, overrides: list[str]) -> str:
  """`python -m mdlm.train <overrides>` into run_dir, unless its status says it finished;
  returns run_dir. A failed run stops the script with the trainer's last output."""
  if (RunDir(run_dir).read_status() or {}).get("state") == "finished":
    return run_dir
  cmd = [sys.executable, "-m", "mdlm.train", *overrides, f"hydra.run.dir={run_dir}",
         "train.progress=false"]
  print(f"[{time.strftime('%H:%M:%S')}] training {name}: {' '.join(cmd[2:])} "
        f"(load {loadavg()})", flush=True)
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"training {name} failed:\n{proc.stderr[-3000:]}")
  print(f"  finished in {time.time() - t0:.0f} s (load {loadavg()})", flush=True)
  return run_dir
