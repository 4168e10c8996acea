"""The IsoFLOP planner: compute budgets x model family -> training jobs, for MDLM and AR alike.

For each budget C and each size with per-token training FLOPs F (6N by default, as SMDM), the
run sees D = C / F tokens, rounded to whole optimizer steps of batch_size x seq_len tokens; the
cosine schedule spans those steps with 1% warmup (SMDM). Each job gets a deterministic run
directory, so re-running a sweep skips finished runs and resumes interrupted ones
(`train.resume=auto`).

Written out (`write_plan`):
  recipe.yaml      the recipe the plan came from
  jobs.jsonl       the plain job list (one JSON object per job; `launch` reads it)
  jobs.csv         the same as a table
  skipped.jsonl    (budget, size) pairs that cannot run (budget below one step)
  hydra/scaling_job/<job_id>.yaml   one `# @package _global_` config per job
  sweep.sh         the Hydra multirun command (basic launcher; SLURM via submitit documented)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
from pathlib import Path
from typing import Optional

import yaml

from mdlm.scaling.family import FLOP_CONVENTIONS, Family, aspect_family, explicit_family, \
    smdm_family

KIND_LABELS = {"denoiser": "mdlm", "ar": "ar"}


@dataclasses.dataclass
class SweepRecipe:
  """Everything a sweep needs. `family` is {"type": "aspect"|"smdm"|"explicit", ...} (the
  arguments of the matching constructor in mdlm.scaling.family)."""

  name: str
  budgets: list
  family: dict
  kinds: list = dataclasses.field(default_factory=lambda: ["denoiser", "ar"])
  batch_size: int = 32
  seq_len: int = 128
  vocab_size: int = 0              # only the "full" FLOP convention needs it
  flops: str = "6N"                # which FLOPs per token define C: "6N" or "full"
  seeds: list = dataclasses.field(default_factory=lambda: [0])
  lr: float = 3e-3
  warmup_fraction: float = 0.01    # SMDM: 1% of the steps
  final_lr_fraction: float = 0.1   # SMDM: cosine to 10% of the peak
  min_steps: int = 100             # fewer steps are flagged "few_steps"
  max_steps: int = 100_000         # more steps are flagged "many_steps"
  drop_flagged: bool = False       # leave flagged jobs out of the plan (they stay listed)
  # Per budget, only the `sizes_per_budget` sizes nearest (in log N) to the size with
  # `tokens_per_param` tokens per parameter (D / N; Hoffmann et al. found ~20 compute-optimal);
  # 0 plans every size at every budget.
  sizes_per_budget: int = 0
  tokens_per_param: float = 20.0
  min_warmup_steps: int = 0        # warmup = max(ceil(warmup_fraction * steps), this)
  evals_per_run: int = 4           # eval_every = ceil(steps / evals_per_run)
  checkpoints_per_run: int = 4     # checkpoint_every = ceil(steps / checkpoints_per_run)
  sweep_dir: str = ""              # default: runs/scaling/<name>
  overrides: list = dataclasses.field(default_factory=list)   # shared Hydra overrides
  kind_overrides: dict = dataclasses.field(default_factory=dict)  # kind -> [dotted overrides]

  def __post_init__(self):
    def bad(msg):
      raise ValueError(f"sweep recipe {self.name!r}: {msg}")
    if not self.budgets:
      bad("budgets is empty; give compute budgets in FLOPs, e.g. [1e12, 3e12, 1e13]")
    try:
      self.budgets = sorted(float(c) for c in self.budgets)
    except (TypeError, ValueError):
      bad(f"budgets must be numbers, got {self.budgets!r}")
    if any(not (c > 0 and math.isfinite(c)) for c in self.budgets):
      bad(f"budgets must be positive and finite, got {self.budgets}")
    if len(set(self.budgets)) != len(self.budgets):
      bad(f"budgets repeat: {self.budgets}")
    unknown = set(self.kinds) - set(KIND_LABELS)
    if not self.kinds or unknown:
      bad(f"kinds must be a non-empty subset of {list(KIND_LABELS)}, got {self.kinds}")
    if self.flops not in FLOP_CONVENTIONS:
      bad(f"flops={self.flops!r}; choose one of {FLOP_CONVENTIONS}")
    if self.flops == "full" and self.vocab_size < 1:
      bad("flops='full' counts the output head: set vocab_size to the tokenizer's size")
    for key in ("batch_size", "seq_len", "evals_per_run", "checkpoints_per_run", "min_steps"):
      if getattr(self, key) < 1:
        bad(f"{key}={getattr(self, key)} must be >= 1")
    if self.max_steps < self.min_steps:
      bad(f"max_steps={self.max_steps} < min_steps={self.min_steps}")
    if not 0.0 <= self.warmup_fraction < 1.0:
      bad(f"warmup_fraction={self.warmup_fraction} must lie in [0, 1)")
    if self.sizes_per_budget < 0 or not self.tokens_per_param > 0 or self.min_warmup_steps < 0:
      bad("sizes_per_budget and min_warmup_steps must be >= 0, tokens_per_param > 0")
    if not self.lr > 0:
      bad(f"lr={self.lr} must be > 0")
    if not self.seeds:
      bad("seeds is empty")
    for o in list(self.overrides) + [o for v in self.kind_overrides.values() for o in v]:
      if "=" not in str(o):
        bad(f"override {o!r} is not key=value")
    for kind, extra in self.kind_overrides.items():
      if kind not in KIND_LABELS:
        bad(f"kind_overrides has unknown kind {kind!r}")
      for o in extra:
        if "." not in o.split("=", 1)[0]:
          bad(f"kind_overrides entries must be dotted keys (e.g. optim.lr=1e-3), got {o!r}")
    if not self.sweep_dir:
      self.sweep_dir = os.path.join("runs", "scaling", self.name)

  @classmethod
  def load(cls, path: str | Path, **changes) -> "SweepRecipe":
    with open(path) as f:
      data = yaml.safe_load(f) or {}
    data.update({k: v for k, v in changes.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
      raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**data)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def build_family(self) -> Family:
    spec = dict(self.family)
    kind = spec.pop("type", None)
    if kind == "aspect":
      return aspect_family(**spec)
    if kind == "smdm":
      return smdm_family(spec.get("names"))
    if kind == "explicit":
      sizes = spec.pop("sizes")
      return explicit_family(sizes, **spec)
    raise ValueError(f"recipe family type {kind!r}; choose aspect, smdm or explicit")


@dataclasses.dataclass
class Job:
  job_id: str
  kind: str                 # "denoiser" | "ar"
  family: str               # "mdlm" | "ar" (the label used in tables and plots)
  budget: float             # the planned compute C
  size: str
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  N: int                    # non-embedding parameters
  flops_per_token: float    # under the recipe's convention
  steps: int
  tokens: int               # D = steps * batch_size * seq_len
  compute: float            # flops_per_token * tokens (within one step of the budget)
  warmup_steps: int
  seed: int
  run_dir: str
  overrides: list           # the full Hydra override list for `python -m mdlm.train`
  flags: list               # "few_steps", "many_steps"

  def command(self, python: str = "python") -> list[str]:
    return [python, "-m", "mdlm.train", *self.overrides]


def _budget_tag(c: float) -> str:
  exponent = int(math.floor(math.log10(c)))
  mantissa = round(c / 10 ** exponent, 3)
  if mantissa >= 10:
    mantissa, exponent = mantissa / 10, exponent + 1
  return f"{mantissa:g}e{exponent}"


def plan_sweep(recipe: SweepRecipe,
               family: Optional[Family] = None) -> tuple[list[Job], list[dict]]:
  """The IsoFLOP grid. Returns (jobs, skipped) where skipped lists (budget, size, kind) pairs
  whose budget is below one optimizer step. Raises if a budget is below one step of the
  smallest model (nothing at that budget could run)."""
  family = family or recipe.build_family()
  step_tokens = recipe.batch_size * recipe.seq_len
  jobs, skipped = [], []
  for kind in recipe.kinds:
    label = KIND_LABELS[kind]
    sizes = sorted(family, key=lambda s: family.flops_per_token(
        s, seq_len=recipe.seq_len, vocab_size=recipe.vocab_size, convention=recipe.flops,
        kind=kind))
    for budget in recipe.budgets:
      smallest = sizes[0]
      f_small = family.flops_per_token(smallest, seq_len=recipe.seq_len,
                                       vocab_size=recipe.vocab_size, convention=recipe.flops,
                                       kind=kind)
      if budget < f_small * step_tokens:
        raise ValueError(
            f"budget C={budget:g} is smaller than one step of the smallest model {smallest.name}"
            f" ({f_small:g} FLOPs/token x {step_tokens} tokens = {f_small * step_tokens:g}); "
            "raise the budget or lower batch_size / seq_len.")
      for size in _window(sizes, family, kind, budget, recipe):
        fpt = family.flops_per_token(size, seq_len=recipe.seq_len, vocab_size=recipe.vocab_size,
                                     convention=recipe.flops, kind=kind)
        # Whole steps, nearest to C / (F x tokens per step): |tokens F - C| <= F x step / 2.
        steps = int(round(budget / (fpt * step_tokens)))
        if steps < 1:
          skipped.append({"kind": kind, "budget": budget, "size": size.name,
                          "reason": f"budget below one step ({fpt * step_tokens:g} FLOPs)"})
          continue
        flags = []
        if steps < recipe.min_steps:
          flags.append("few_steps")
        if steps > recipe.max_steps:
          flags.append("many_steps")
        if flags and recipe.drop_flagged:
          skipped.append({"kind": kind, "budget": budget, "size": size.name,
                          "reason": f"flagged {flags} (steps={steps})"})
          continue
        for seed in recipe.seeds:
          jobs.append(_job(recipe, family, kind, label, budget, size, fpt, steps, seed, flags))
  return jobs, skipped


def _window(sizes, family, kind, budget, recipe):
  """The sizes planned at one budget (all, or a window around the D / N = tokens_per_param
  size: N* = sqrt(C / (6 tokens_per_param)) from C = 6 N D)."""
  k = recipe.sizes_per_budget
  if not k or k >= len(sizes):
    return sizes
  by_n = sorted(sizes, key=lambda s: family.non_embedding_params(s, kind=kind))
  logn = [math.log(family.non_embedding_params(s, kind=kind)) for s in by_n]
  target = 0.5 * math.log(budget / (6.0 * recipe.tokens_per_param))
  centre = min(range(len(by_n)), key=lambda i: abs(logn[i] - target))
  start = min(max(0, centre - (k - 1) // 2 - (1 if (k % 2 == 0 and target < logn[centre])
                                               else 0)), len(by_n) - k)
  return by_n[start:start + k]


def _job(recipe, family, kind, label, budget, size, fpt, steps, seed, flags) -> Job:
  tag = _budget_tag(budget)
  job_id = f"{label}-C{tag}-{size.name}-s{seed}"
  run_dir = os.path.join(recipe.sweep_dir, label, f"C{tag}", f"{size.name}-s{seed}")
  family.config(size, kind=kind, seq_len=recipe.seq_len)  # validates the size (raises early)
  tokens = steps * recipe.batch_size * recipe.seq_len
  warmup = min(max(int(math.ceil(recipe.warmup_fraction * steps)), recipe.min_warmup_steps),
               steps - 1)
  model_fields = {"kind": kind, "name": size.name, "num_layers": size.num_layers,
                  "d_model": size.d_model, "num_heads": size.num_heads, "d_ff": size.d_ff,
                  "max_seq_len": recipe.seq_len,
                  **{k: v for k, v in family.model.items() if k != "kind"}}
  overrides = [f"model.{k}={_value(v)}" for k, v in model_fields.items()]
  overrides += [
      f"data.seq_len={recipe.seq_len}", f"train.batch_size={recipe.batch_size}",
      f"train.steps={steps}", f"train.seed={seed}", f"optim.lr={recipe.lr:g}",
      "optim.decay=cosine", f"optim.warmup_steps={warmup}",
      f"optim.final_lr_fraction={recipe.final_lr_fraction:g}",
      f"train.eval_every={max(1, math.ceil(steps / recipe.evals_per_run))}",
      f"train.checkpoint_every={max(1, math.ceil(steps / recipe.checkpoints_per_run))}",
      "train.resume=auto", f"run_dir={run_dir}",
  ]
  overrides += list(recipe.kind_overrides.get(kind, []))
  overrides += list(recipe.overrides)
  overrides = _last_wins(overrides)
  return Job(job_id=job_id, kind=kind, family=label, budget=budget, size=size.name,
             num_layers=size.num_layers, d_model=size.d_model, num_heads=size.num_heads,
             d_ff=size.d_ff, N=family.non_embedding_params(size, kind=kind), flops_per_token=fpt,
             steps=steps, tokens=tokens, compute=fpt * tokens, warmup_steps=warmup, seed=seed,
             run_dir=run_dir, overrides=overrides, flags=flags)


def _value(v) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if v is None:
    return "null"
  return str(v)


def _last_wins(overrides: list[str]) -> list[str]:
  """Later overrides of the same key replace earlier ones (recipe overrides beat defaults)."""
  seen: dict[str, str] = {}
  for o in overrides:
    seen[o.split("=", 1)[0].lstrip("+~")] = o
  return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Writing a plan.

_CSV_FIELDS = ["job_id", "family", "kind", "budget", "size", "num_layers", "d_model",
               "num_heads", "d_ff", "N", "flops_per_token", "steps", "tokens", "compute",
               "warmup_steps", "seed", "flags", "run_dir"]

SLURM_NOTE = """\
# SLURM (not installed here): pip install hydra-submitit-launcher, then append e.g.
#   hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> \\
#   hydra.launcher.timeout_min=240 hydra.launcher.gpus_per_node=1 hydra.launcher.tasks_per_node=1 \\
#   hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=64 hydra.launcher.array_parallelism=16
# to the multirun command. Every job writes to its own run_dir with train.resume=auto, so
# resubmitting the same command after a preemption resumes the unfinished jobs.
"""


def _override_to_nested(overrides: list[str]) -> dict:
  out: dict = {}
  for o in overrides:
    key, value = o.split("=", 1)
    node = out
    parts = key.lstrip("+").split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
  return out


def write_plan(recipe: SweepRecipe, jobs: list[Job], skipped: list[dict], out_dir: str | Path,
               *, python: str = "python") -> Path:
  out = Path(out_dir)
  (out / "hydra" / "scaling_job").mkdir(parents=True, exist_ok=True)
  with open(out / "recipe.yaml", "w") as f:
    yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
  with open(out / "jobs.jsonl", "w") as f:
    for j in jobs:
      f.write(json.dumps(dataclasses.asdict(j)) + "\n")
  with open(out / "skipped.jsonl", "w") as f:
    for s in skipped:
      f.write(json.dumps(s) + "\n")
  with open(out / "jobs.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
    w.writeheader()
    for j in jobs:
      row = {k: getattr(j, k) for k in _CSV_FIELDS}
      row["flags"] = ";".join(j.flags)
      w.writerow(row)
  # Per-job configs: everything that differs between jobs (shared CLI-style overrides, which may
  # select config groups, stay on the command line).
  shared = set(recipe.overrides)
  for old in (out / "hydra" / "scaling_job").glob("*.yaml"):
    old.unlink()
  for j in jobs:
    own = [o for o in j.overrides if o not in shared]
    with open(out / "hydra" / "scaling_job" / f"{j.job_id}.yaml", "w") as f:
      f.write("# @package _global_\n")
      yaml.safe_dump(_override_to_nested(own), f, sort_keys=False)
  (out / "sweep.sh").write_text(sweep_script(recipe, jobs, out, python=python))
  os.chmod(out / "sweep.sh", 0o755)
  return out


def sweep_script(recipe: SweepRecipe, jobs: list[Job], plan_dir: Path, *,
                 python: str = "python") -> str:
  """A shell script with the Hydra multirun over all jobs (one per kind) and the SLURM recipe."""
  lines = ["#!/usr/bin/env bash",
           f"# IsoFLOP sweep {recipe.name!r}: {len(jobs)} jobs. Run from the repository root.",
           "# Preferred locally: python -m mdlm.scaling launch " + shlex.quote(str(plan_dir)),
           "# (sequential, skips finished runs). The same jobs as a Hydra multirun:",
           SLURM_NOTE.rstrip(), "set -euo pipefail", ""]
  for kind in recipe.kinds:
    ids = [j.job_id for j in jobs if j.kind == kind]
    if not ids:
      continue
    cmd = [python, "-m", "mdlm.train", "-m",
           f"hydra.searchpath=[file://{Path(plan_dir) / 'hydra'}]",  # relative to the cwd
           "+scaling_job=" + ",".join(ids),
           f"hydra.sweep.dir={os.path.join(recipe.sweep_dir, 'hydra', KIND_LABELS[kind])}",
           "hydra.sweep.subdir=${hydra.job.num}", *recipe.overrides, '"$@"']
    quoted = [shlex.quote(c) if c != '"$@"' else c for c in cmd]
    lines.append(" ".join(quoted[:4]) + " \\\n  " + " \\\n  ".join(quoted[4:]))
    lines.append("")
  return "\n".join(lines)


def load_jobs(path: str | Path) -> list[Job]:
  """Jobs from a plan directory or its jobs.jsonl."""
  path = Path(path)
  if path.is_dir():
    path = path / "jobs.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found; write a plan first: python -m mdlm.scaling plan "
                            "<recipe.yaml> --out <plan_dir>")
  with open(path) as f:
    return [Job(**json.loads(line)) for line in f if line.strip()]
