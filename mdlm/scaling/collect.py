"""Collect run directories into one tidy table (one row per run), failures included.

Reads the run-directory layout written by `mdlm.train` (config.yaml, metrics.jsonl,
status.json) and, when given, the plan's jobs.jsonl: a planned job whose directory does not
exist is listed with status "not_started"; a job the launcher saw crash before the trainer
wrote status.json is listed as "failed" with the launcher's message. Nothing is dropped here;
`fit_rows` chooses what the fits use.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import yaml

from mdlm.config import ModelConfig
from mdlm.models.presets import count_params, flops_per_token
from mdlm.rundir import RunDir
from mdlm.scaling.plan import KIND_LABELS, Job, load_jobs

COLUMNS = [
    "job_id", "family", "kind", "size", "num_layers", "d_model", "num_heads", "d_ff", "seed",
    "N", "N_total", "budget", "steps_planned", "step", "steps", "tokens", "D", "C", "C_full",
    "final_val_loss", "final_val_stderr", "final_val_step", "best_val_loss", "best_val_step",
    "final_train_loss", "num_evals", "wall_time", "launch_seconds", "attempts", "status",
    "complete", "message", "run_dir",
]

STATES = ("finished", "failed", "running", "interrupted", "not_started", "unknown")


def _read_json(path: Path) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None



def _model_config(cfg: dict) -> Optional[ModelConfig]:
  fields = cfg.get("model") or {}
  known = {f for f in ModelConfig.__dataclass_fields__}
  try:
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})
  except TypeError:
    return None


def _nan(x) -> float:
  try:
    return float(x) if x is not None else math.nan
  except (TypeError, ValueError):
    return math.nan


def read_run(run_dir: str | Path, job: Optional[Job] = None) -> dict:
  """One table row for a run directory (which may not exist yet when `job` is given)."""
  run_dir = Path(run_dir)
  launch = _read_json(run_dir.parent / f".{run_dir.name}.launch.json")
  if job is None:
    job = _launched_job(launch)
  row = {k: None for k in COLUMNS}
  row["run_dir"] = str(run_dir)
  if job is not None:
    row.update(_job_fields(job))
  run = RunDir(str(run_dir))
  cfg, row["message"] = _read_config(Path(run.config_path))
  seq_len = batch = fpt_full = None
  if cfg is not None:
    fields, seq_len, batch, fpt_full = _config_fields(row, cfg)
    row.update(fields)
  if row["steps"] is None and job is not None:
    row["steps"] = job.steps
  events = run.read_metrics()
  last = max(events, key=lambda e: e.get("step", -1)) if events else None
  row.update(_metric_fields(events, last, seq_len, batch))
  row.update(_state_fields(row, run.read_status(), launch, run_dir.exists(), last))
  row.update(_compute_fields(row["N"], row["tokens"], fpt_full))
  return row


def _launched_job(launch: Optional[dict]) -> Optional[Job]:
  """The job a launch record was written for (a run collected without its plan)."""
  if launch is None or "job" not in launch:
    return None
  try:
    return Job(**launch["job"])
  except TypeError:
    return None


def _job_fields(job: Job) -> dict:
  return {"job_id": job.job_id, "family": job.family, "kind": job.kind, "size": job.size,
          "num_layers": job.num_layers, "d_model": job.d_model, "num_heads": job.num_heads,
          "d_ff": job.d_ff, "seed": job.seed, "N": job.N, "budget": job.budget,
          "steps_planned": job.steps}


def _read_config(path: Path) -> tuple[Optional[dict], Optional[str]]:
  """(config.yaml as a dict or None, a message when it exists but cannot be read)."""
  if not path.exists():
    return None, None
  try:
    with open(path) as f:
      return yaml.safe_load(f) or {}, None
  except (OSError, yaml.YAMLError) as e:
    return None, f"unreadable config.yaml: {e}"


def _config_fields(row: dict, cfg: dict) -> tuple[dict, Optional[int], Optional[int],
                                                   Optional[float]]:
  """The row's fields from config.yaml (the model fills what the plan did not say), and the
  (seq_len, batch_size, full FLOPs per token) that the token and compute counts need."""
  train = cfg.get("train") or {}
  seq_len, batch = (cfg.get("data") or {}).get("seq_len"), train.get("batch_size")
  fields = {"seed": row["seed"] if row["seed"] is not None else train.get("seed"),
            "steps": train.get("steps")}
  model = _model_config(cfg)
  if model is None:
    return fields, seq_len, batch, None
  counts = count_params(model, model.vocab_size)
  fields.update({"kind": row["kind"] or model.kind, "num_layers": model.num_layers,
                 "d_model": model.d_model, "num_heads": model.num_heads, "d_ff": model.d_ff,
                 "N": counts["non_embedding"],
                 "N_total": counts["total"] if model.vocab_size else None,
                 "size": row["size"] or model.name,
                 "family": row["family"] or KIND_LABELS.get(model.kind, model.kind)})
  fpt_full = None
  if seq_len and model.vocab_size:
    fpt_full = flops_per_token(model, seq_len, model.vocab_size)["full"]
  return fields, seq_len, batch, fpt_full


def _metric_fields(events: list[dict], last: Optional[dict], seq_len: Optional[int],
                   batch: Optional[int]) -> dict:
  """Losses and tokens from metrics.jsonl: training events carry "train/loss", evaluations
  "val/nll". Tokens are those of the final evaluation (else of the last event, else counted)."""
  evals = [e for e in events if e.get("val/nll") is not None and math.isfinite(_nan(e["val/nll"]))]
  trains = [e for e in events if e.get("train/loss") is not None]
  fields = {"num_evals": len(evals), "tokens": None, "final_val_step": None}
  if evals:
    final = max(evals, key=lambda e: e.get("step", -1))
    best = min(evals, key=lambda e: _nan(e["val/nll"]))
    fields.update({"final_val_loss": _nan(final["val/nll"]),
                   "final_val_stderr": _nan(final.get("val/nll_stderr")),
                   "final_val_step": final.get("step"), "best_val_loss": _nan(best["val/nll"]),
                   "best_val_step": best.get("step"), "tokens": final.get("tokens")})
  if trains:
    fields["final_train_loss"] = _nan(max(trains, key=lambda e: e.get("step", -1))["train/loss"])
  if fields["tokens"] is None and last is not None:
    fields["tokens"] = last.get("tokens")
  if fields["tokens"] is None and fields["final_val_step"] is not None and seq_len and batch:
    fields["tokens"] = fields["final_val_step"] * seq_len * batch
  return fields


def _state_fields(row: dict, status: Optional[dict], launch: Optional[dict], exists: bool,
                  last: Optional[dict]) -> dict:
  """status, step, wall time and message: the trainer's status.json first, then the launcher's
  record (a crash before the trainer wrote its status), then the last metrics event."""
  fields = {"step": None, "steps": row["steps"], "wall_time": None, "message": row["message"]}
  if status is not None:
    fields.update({"status": status.get("state", "unknown"), "step": status.get("step"),
                   "steps": status.get("steps", row["steps"]),
                   "wall_time": status.get("wall_time"),
                   "message": status.get("message") or row["message"]})
  elif not exists:
    fields["status"] = "not_started"
  else:
    fields["status"] = "unknown"
    fields["message"] = row["message"] or "no status.json (the trainer never started or was killed)"
  if launch is not None:
    # Wall time of every launcher attempt (start-up and compilation included); the trainer's
    # own wall_time covers its last session only.
    fields["launch_seconds"] = launch.get("total_seconds", launch.get("seconds"))
    fields["attempts"] = launch.get("attempts", 1)
    if launch.get("returncode") not in (0, None) and fields["status"] in (
        "not_started", "unknown", "running"):
      fields["status"] = "failed"
      fields["message"] = launch.get("message") or f"exit code {launch['returncode']}"
  if fields["step"] is None and last is not None:
    fields["step"] = last.get("step")
  if fields["wall_time"] is None and last is not None:
    fields["wall_time"] = last.get("wall_time")
  if fields["status"] not in STATES:
    fields["status"] = "unknown"
  fields["complete"] = fields["status"] == "finished"
  return fields


def _compute_fields(N: Optional[int], tokens, fpt_full: Optional[float]) -> dict:
  """Compute actually spent up to the final evaluation: C = 6 N D (and the "full" count)."""
  if not (N and tokens):
    return {}
  D = float(tokens)
  fields = {"D": D, "C": 6.0 * N * D}
  if fpt_full:
    fields["C_full"] = fpt_full * D
  return fields


def find_run_dirs(root: str | Path) -> list[Path]:
  """Every directory under root holding status.json, config.yaml or metrics.jsonl (not
  descending into a run's own subdirectories, e.g. checkpoints/), and every run directory named
  by a launch record `.<run>.launch.json`."""
  root = Path(root)
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # A run the launcher started but that died before writing anything: its launch record.
    for name in filenames:
      if name.startswith(".") and name.endswith(".launch.json"):
        found.append(Path(dirpath) / name[1:-len(".launch.json")])
    if set(RunDir.RECORD_FILES) & set(filenames):
      found.append(Path(dirpath))
      dirnames[:] = []
    else:
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "hydra")
  return sorted(set(found))


def collect_runs(paths: Iterable[str | Path] | str | Path, *,
                 plan: Optional[str | Path] = None) -> list[dict]:
  """Rows for every run found under `paths` and every job of `plan` (a plan dir or jobs.jsonl).

  A path that is itself a plan directory (holds jobs.jsonl) contributes its jobs. Rows come out
  sorted by (family, budget, N, seed)."""
  if isinstance(paths, (str, Path)):
    paths = [paths]
  jobs: dict[str, Job] = {}
  plans = [plan] if plan is not None else []
  dirs: list[Path] = []
  for p in paths:
    p = Path(p)
    if (p / "jobs.jsonl").exists() or p.suffix == ".jsonl":
      plans.append(p)
    elif p.exists():
      dirs.extend(find_run_dirs(p))
    else:
      raise FileNotFoundError(f"{p} does not exist (give a sweep directory or a plan directory)")
  for pl in plans:
    for j in load_jobs(pl):
      jobs[os.path.normpath(j.run_dir)] = j
  rows = {}
  for key, job in jobs.items():
    rows[key] = read_run(job.run_dir, job)
  for d in dirs:
    key = os.path.normpath(str(d))
    if key not in rows:
      rows[key] = read_run(d)
  def order(r):
    return (str(r["family"]), _nan(r["budget"]) if r["budget"] is not None else math.inf,
            _nan(r["N"]), r["seed"] or 0, r["run_dir"])
  return sorted(rows.values(), key=order)


def status_counts(rows: list[dict]) -> dict[str, int]:
  out: dict[str, int] = {}
  for r in rows:
    out[r["status"]] = out.get(r["status"], 0) + 1
  return out


def fit_rows(rows: list[dict], *, family: Optional[str] = None, require_finished: bool = True,
             loss: str = "final_val_loss") -> list[dict]:
  """Rows usable by the fits: finished (unless told otherwise), with N, D and a finite loss."""
  out = []
  for r in rows:
    if family is not None and r["family"] != family:
      continue
    if require_finished and r["status"] != "finished":
      continue
    if not (r["N"] and r["D"] and math.isfinite(_nan(r.get(loss)))):
      continue
    out.append(r)
  return out


def write_csv(rows: list[dict], path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
  return path


_INT = {"num_layers", "d_model", "num_heads", "d_ff", "seed", "N", "N_total", "steps_planned",
        "step", "steps", "tokens", "final_val_step", "best_val_step", "num_evals", "attempts"}
_STR = {"job_id", "family", "kind", "size", "status", "message", "run_dir"}


def read_csv(path: str | Path) -> list[dict]:
  """A table written by write_csv, with numbers parsed back (empty cells -> None)."""
  rows = []
  with open(path, newline="") as f:
    for raw in csv.DictReader(f):
      row = {}
      for k, v in raw.items():
        if v == "" or v is None:
          row[k] = None
        elif k in _STR:
          row[k] = v
        elif k == "complete":
          row[k] = v == "True"
        elif k in _INT:
          row[k] = int(float(v))
        else:
          row[k] = float(v)
      rows.append(row)
  if not rows:
    raise ValueError(f"{path} holds no runs (empty table); collect a sweep first.")
  return rows


def read_curves(rows: list[dict]) -> list[dict]:
  """Every evaluation along every run's training curve: (family, run, step, tokens, N, D, C,
  loss), for Approach 1 over training curves."""
  out = []
  for r in rows:
    if not r.get("N"):
      continue
    for e in RunDir(r["run_dir"]).read_metrics():
      if e.get("val/nll") is None or not e.get("tokens"):
        continue
      out.append({"family": r["family"], "run_dir": r["run_dir"], "budget": r["budget"],
                  "step": e.get("step"), "N": r["N"], "D": float(e["tokens"]),
                  "C": 6.0 * r["N"] * float(e["tokens"]), "loss": _nan(e["val/nll"])})
  return out


CURVE_COLUMNS = ["family", "run_dir", "budget", "step", "N", "D", "C", "loss"]


def write_curves_csv(curves: list[dict], path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for c in curves:
      w.writerow({k: ("" if c.get(k) is None else c.get(k)) for k in CURVE_COLUMNS})
  return path


def read_curves_csv(path: str | Path) -> list[dict]:
  out = []
  with open(path, newline="") as f:
    for raw in csv.DictReader(f):
      out.append({k: (v if k in ("family", "run_dir") else
                      (None if v == "" else float(v))) for k, v in raw.items()})
  return out
