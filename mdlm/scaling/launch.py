"""Run a planned sweep locally, one job at a time, one subprocess per job.

Each job runs `python -m mdlm.train <overrides>` in the current directory (run dirs in the plan
are relative to it; launch from the repository root). A job whose status.json says "finished"
with step >= steps is skipped; any other job is (re)started with train.resume=auto, so an
interrupted run resumes from its last checkpoint. The launcher records each attempt beside the
run directory in `.<run>.launch.json` (exit code, seconds, log tail), which `collect` uses to
report a run that crashed before the trainer wrote its status. Output of each job goes to
`<sweep_dir>/logs/<job_id>.log`.

For SLURM use the Hydra multirun in the plan's sweep.sh with hydra-submitit-launcher (see
experiments/scaling/README.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from mdlm.rundir import RunDir
from mdlm.scaling.plan import Job


def is_finished(job: Job) -> bool:
  status = RunDir(job.run_dir).read_status() or {}
  return status.get("state") == "finished" and int(status.get("step") or 0) >= job.steps


def _state(job: Job) -> Optional[str]:
  return (RunDir(job.run_dir).read_status() or {}).get("state")


def _record(job: Job, **fields) -> None:
  """Writes the launch record; total_seconds and attempts add up over resumed attempts."""
  run_dir = Path(job.run_dir)
  run_dir.parent.mkdir(parents=True, exist_ok=True)
  path = run_dir.parent / f".{run_dir.name}.launch.json"
  try:
    with open(path) as f:
      previous = json.load(f)
  except (OSError, ValueError):
    previous = {}
  fields["total_seconds"] = previous.get("total_seconds", 0.0) + fields.get("seconds", 0.0)
  fields["attempts"] = previous.get("attempts", 0) + 1
  with open(path, "w") as f:
    json.dump({"job_id": job.job_id, **fields, "job": dataclasses.asdict(job)}, f)


def _tail(path: Path, lines: int = 20) -> str:
  try:
    return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
  except OSError:
    return ""


def launch(jobs: Sequence[Job], *, python: str = sys.executable, module: str = "mdlm.train",
           extra: Sequence[str] = (),
           dry_run: bool = False, stop_on_error: bool = False, max_jobs: Optional[int] = None,
           deadline: Optional[float] = None, log_dir: Optional[str | Path] = None,
           echo: Callable[[str], None] = print) -> dict[str, list[str]]:
  """Runs the unfinished jobs in order. Returns {"finished": [...], "skipped": [...],
  "failed": [...], "pending": [...]} job ids.

  deadline: a time.time() after which no new job starts (a started job runs to its end; give
  train.max_wall_minutes in `extra` to bound it too). Ctrl-C stops the current job (the trainer
  is expected to checkpoint and mark itself interrupted) and the sweep.
  """
  result = {"finished": [], "skipped": [], "failed": [], "pending": []}
  started = 0
  for i, job in enumerate(jobs):
    if is_finished(job):
      result["skipped"].append(job.job_id)
      continue
    if (max_jobs is not None and started >= max_jobs) or (
        deadline is not None and time.time() >= deadline):
      result["pending"].append(job.job_id)
      continue
    cmd = [python, "-m", module, *job.overrides, *extra]
    echo(f"[{i + 1}/{len(jobs)}] {job.job_id}: {job.steps} steps, N={job.N:,}")
    if dry_run:
      echo("  " + " ".join(cmd))
      result["pending"].append(job.job_id)
      continue
    started += 1
    logs = Path(log_dir) if log_dir else Path(job.run_dir).parents[2] / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{job.job_id}.log"
    t0 = time.time()
    with open(log_path, "a") as log:
      log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
      log.flush()
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
      try:
        code = proc.wait()
      except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
          proc.kill()
        _record(job, returncode=-2, seconds=time.time() - t0, message="interrupted by user")
        result["pending"].extend(j.job_id for j in jobs[i:])
        echo("interrupted; re-run the same command to resume")
        return result
    seconds = time.time() - t0
    ok = code == 0 and is_finished(job)
    if code == 0 and not ok and _state(job) == "interrupted":
      # Stopped on purpose (e.g. train.max_wall_minutes); the next launch resumes it.
      _record(job, returncode=0, seconds=seconds, message="interrupted", log=str(log_path))
      echo(f"  interrupted after {seconds:.0f}s; re-run to resume")
      result["pending"].append(job.job_id)
      continue
    message = "" if ok else (f"exit code {code}" + (
        "" if code else " but status.json is not 'finished'") + "\n" + _tail(log_path))
    _record(job, returncode=code if code or ok else 1, seconds=seconds, message=message.strip(),
            log=str(log_path))
    echo(f"  {'done' if ok else 'FAILED'} in {seconds:.0f}s" + ("" if ok else f" (see {log_path})"))
    result["finished" if ok else "failed"].append(job.job_id)
    if not ok and stop_on_error:
      result["pending"].extend(j.job_id for j in jobs[i + 1:])
      break
  return result
