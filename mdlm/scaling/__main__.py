"""python -m mdlm.scaling {plan, launch, collect, fit, plot, all} ...

  plan    RECIPE.yaml --out PLAN_DIR  IsoFLOP grid -> jobs.jsonl, jobs.csv, sweep.sh, hydra/
  launch  PLAN_DIR [--hours H]        run the unfinished jobs one by one (finished: skipped)
  collect PLAN_DIR                    -> PLAN_DIR/../results.csv and curves.csv
  fit     DIR/results.csv             -> DIR/fits.json (Approach 1 over DIR/curves.csv if there)
  plot    DIR/fits.json               -> DIR/scaling.png, DIR/scaling.svg (of DIR/results.csv)
  all     PLAN_DIR                    collect + fit + plot into PLAN_DIR/..

Every output goes beside its input by default, so the lines above chain; --out puts it elsewhere
(collect also takes sweep directories, which need --out). Each command prints what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from mdlm.cli import setup_logging
from mdlm.scaling.analyze import fit_sweep, format_summary, load_json, summary_table, to_json
from mdlm.scaling.collect import collect_runs, read_csv, read_curves, read_curves_csv, \
    status_counts, write_csv, write_curves_csv
from mdlm.scaling.fit import chinchilla_grid
from mdlm.scaling.launch import launch
from mdlm.scaling.plan import SweepRecipe, load_jobs, plan_sweep, write_plan


def _shown(path: Path | str) -> str:
  """A path as the user would type it: relative to the working directory when inside it."""
  rel = os.path.relpath(path)
  return str(path) if rel.startswith("..") else rel


def _plan(args):
  changes = {}
  if args.budgets:
    changes["budgets"] = [float(b) for b in args.budgets.split(",")]
  if args.sweep_dir:
    changes["sweep_dir"] = args.sweep_dir
  recipe = SweepRecipe.load(args.recipe, **changes)
  jobs, skipped = plan_sweep(recipe)
  out = write_plan(recipe, jobs, skipped, args.out)
  total = sum(j.compute for j in jobs)
  print(f"{len(jobs)} jobs ({', '.join(recipe.kinds)}), {len(skipped)} skipped, total "
        f"{total:.3g} FLOPs ({recipe.flops})")
  print(f"{'job':34s} {'N':>10s} {'steps':>7s} {'tokens':>10s} {'C/budget':>9s} flags")
  for j in jobs:
    print(f"{j.job_id:34s} {j.N:10,d} {j.steps:7d} {j.tokens:10,d} {j.compute / j.budget:9.4f} "
          f"{','.join(j.flags)}")
  for s in skipped:
    print(f"skipped {s['kind']} C={s['budget']:g} {s['size']}: {s['reason']}")
  print(f"wrote {_shown(out)}/ (jobs.jsonl, jobs.csv, sweep.sh, hydra/, recipe.yaml)")


def _launch(args):
  jobs = load_jobs(args.plan)
  if args.only:
    jobs = [j for j in jobs if j.family == args.only or j.kind == args.only]
  if args.order == "budget":
    # Interleave the families budget by budget, so a sweep cut short has comparable coverage.
    jobs.sort(key=lambda j: (j.budget, j.N, j.family))
  deadline = time.time() + args.hours * 3600 if args.hours else None
  t0 = time.time()
  result = launch(jobs, extra=list(args.extra or []), dry_run=args.dry_run,
                  stop_on_error=args.stop_on_error, max_jobs=args.max_jobs, deadline=deadline)
  print(json.dumps({k: len(v) for k, v in result.items()}), f"in {time.time() - t0:.0f}s")
  if result["failed"]:
    print("failed:", ", ".join(result["failed"]))
  return 1 if result["failed"] else 0


def _is_plan(path: Path) -> bool:
  return (path / "jobs.jsonl").exists() or path.suffix == ".jsonl"


def results_beside_plan(paths: Sequence[str | Path], out: str = "--out RESULTS.csv") -> Path:
  """PLAN_DIR/../results.csv for the plan directory (or its jobs.jsonl) among `paths`."""
  plans = [p if p.is_dir() else p.parent for p in map(Path, paths) if _is_plan(p)]
  parents = {Path(os.path.abspath(p)).parent for p in plans}
  if len(parents) != 1:
    what = "no plan directory (holding jobs.jsonl)" if not plans else "plans in different places"
    raise ValueError(f"{what} among {[str(p) for p in paths]} to put results.csv beside; "
                     f"give {out}.")
  return parents.pop() / "results.csv"


def collect_to(paths: Sequence[str | Path], out: Path, curves_out: Optional[Path]) -> None:
  rows = collect_runs(paths)
  print(f"wrote {_shown(write_csv(rows, out))}: {len(rows)} runs, {status_counts(rows)}")
  if curves_out:
    curves = read_curves(rows)
    print(f"wrote {_shown(write_curves_csv(curves, curves_out))}: {len(curves)} evaluations "
          "along the training curves")
  for r in rows:
    if r["status"] != "finished":
      print(f"  {r['status']:12s} {r['job_id'] or r['run_dir']}: {(r['message'] or '')[:100]}")


def _collect(args):
  if args.out:
    out, curves_out = Path(args.out), args.curves_out
  else:
    out = results_beside_plan(args.paths)
    curves_out = args.curves_out or out.parent / "curves.csv"
  collect_to(args.paths, out, Path(curves_out) if curves_out else None)


def fit_to(table: Path, out: Path, curves: Optional[str], *, bootstrap: int, seed: int = 0,
           ci: float = 0.95, coarse_grid: bool = False, parametric: bool = True) -> None:
  """curves: a curves CSV, "runs" (read the run directories), "none", or None: the curves.csv
  beside the table when there is one (what `collect` writes by default)."""
  if not table.exists():
    raise ValueError(f"fit: no results table at {table}; write it with "
                     "`python -m mdlm.scaling collect PLAN_DIR`.")
  rows = read_csv(table)
  if curves is None:
    beside = table.parent / "curves.csv"
    curves = str(beside) if beside.exists() else "none"
  if curves == "none":
    points = None
  elif curves == "runs":
    points = read_curves(rows)
  else:
    points = read_curves_csv(curves)
  source = {"none": "the final evaluations", "runs": "the runs' training curves"}.get(curves)
  print(f"Approach 1 over {source or _shown(curves)}")
  t0 = time.time()
  result = fit_sweep(rows, curves=points, bootstrap=bootstrap, seed=seed, ci=ci,
                     grid=chinchilla_grid()[::7] if coarse_grid else None, parametric=parametric)
  result["seconds"]["total"] = time.time() - t0
  path = to_json(result, out)
  print(format_summary(summary_table(result)))
  print("seconds:", {k: round(v, 1) for k, v in result["seconds"].items()})
  print(f"wrote {_shown(path)}")


def _fit(args):
  table = Path(args.table)
  fit_to(table, Path(args.out) if args.out else table.parent / "fits.json", args.curves,
         bootstrap=args.bootstrap, seed=args.seed, ci=args.ci, coarse_grid=args.coarse_grid,
         parametric=not args.no_parametric)


def plot_to(table: Path, fits_path: Path, stem: Path, title: str = "") -> None:
  # Imported here, not at the top: pyplot adds ~0.5 s that the other commands do not need, and
  # the Agg backend (files only) is this command's choice, not that of a notebook importing us.
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from mdlm.scaling.plot import plot_sweep  # pylint: disable=import-outside-toplevel
  rows = read_csv(table)
  fits = load_json(fits_path)
  iso = {k: v["approach2"] for k, v in fits["families"].items()}
  par = {k: v["approach3"] for k, v in fits["families"].items() if "approach3" in v}
  paths = plot_sweep(rows, iso, stem, parametric=par, title=title)
  print("wrote", ", ".join(_shown(p) for p in paths))


def _plot_inputs(inputs: Sequence[str]) -> tuple[Path, Path]:
  """(results table, fits) from `FITS.json` or `RESULTS.csv FITS.json` (either order)."""
  paths = [Path(p) for p in inputs]
  fits = [p for p in paths if p.suffix == ".json"]
  tables = [p for p in paths if p.suffix == ".csv"]
  if len(fits) != 1 or len(tables) > 1 or len(fits) + len(tables) != len(paths):
    raise ValueError(f"plot takes FITS.json, optionally with its RESULTS.csv; got {inputs}.")
  if not fits[0].exists():
    raise ValueError(f"plot: {fits[0]} does not exist; write it with "
                     "`python -m mdlm.scaling fit RESULTS.csv`.")
  table = tables[0] if tables else fits[0].parent / "results.csv"
  if not table.exists():
    where = "" if tables else f" (looked beside {fits[0]})"
    raise ValueError(f"plot: no results table at {table}{where}; give it: "
                     f"plot {fits[0]} RESULTS.csv.")
  return table, fits[0]


def _plot(args):
  table, fits = _plot_inputs(args.inputs)
  plot_to(table, fits, Path(args.out) if args.out else fits.parent / "scaling", args.title or "")


def _all(args):
  out = Path(args.out) if args.out else results_beside_plan([args.plan], "--out DIR").parent
  collect_to([args.plan], out / "results.csv", out / "curves.csv")
  fit_to(out / "results.csv", out / "fits.json", str(out / "curves.csv"),
         bootstrap=args.bootstrap, coarse_grid=args.coarse_grid)
  plot_to(out / "results.csv", out / "fits.json", out / "scaling", args.title or "")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mdlm.scaling", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("plan", help="IsoFLOP grid from a sweep recipe")
  s.add_argument("recipe")
  s.add_argument("--out", required=True, help="plan directory")
  s.add_argument("--budgets", help="comma-separated budgets overriding the recipe's")
  s.add_argument("--sweep-dir", help="where the runs go (default runs/scaling/<name>)")
  s.set_defaults(fn=_plan)
  s = sub.add_parser("launch", help="run the plan's unfinished jobs sequentially")
  s.add_argument("plan")
  s.add_argument("--dry-run", action="store_true")
  s.add_argument("--only", help="family label or kind (mdlm, ar, denoiser)")
  s.add_argument("--order", choices=["plan", "budget"], default="plan")
  s.add_argument("--max-jobs", type=int)
  s.add_argument("--hours", type=float, help="start no new job after this many hours")
  s.add_argument("--stop-on-error", action="store_true")
  s.add_argument("extra", nargs="*", help="extra Hydra overrides for every job")
  s.set_defaults(fn=_launch)
  s = sub.add_parser("collect", help="run directories -> results.csv (+ curves.csv)")
  s.add_argument("paths", nargs="+", help="plan directories (jobs.jsonl) and/or sweep dirs")
  s.add_argument("--out", help="results table (default: results.csv beside the plan directory)")
  s.add_argument("--curves-out", help="every evaluation along the training curves, for Approach "
                 "1 (default: curves.csv beside the default results table; none with --out)")
  s.set_defaults(fn=_collect)
  s = sub.add_parser("fit", help="results.csv -> fits.json (Approaches 1-3, multiplier)")
  s.add_argument("table")
  s.add_argument("--out", help="default: fits.json beside the table")
  s.add_argument("--bootstrap", type=int, default=200)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--ci", type=float, default=0.95)
  s.add_argument("--curves", help="Approach 1 over every evaluation along the training curves: "
                 "a curves CSV (default: curves.csv beside the table, if there), 'runs' to read "
                 "the run dirs, or 'none' for the final evaluations only")
  s.add_argument("--coarse-grid", action="store_true",
                 help="Approach 3 from every 7th start of the 4500-start grid")
  s.add_argument("--no-parametric", action="store_true")
  s.set_defaults(fn=_fit)
  s = sub.add_parser("plot", help="fits.json (+ results.csv) -> scaling.png / scaling.svg")
  s.add_argument("inputs", nargs="+", metavar="FILE",
                 help="FITS.json, optionally with RESULTS.csv (default: results.csv beside it)")
  s.add_argument("--out", help="output stem, no suffix (default: scaling beside the fits)")
  s.add_argument("--title")
  s.set_defaults(fn=_plot)
  s = sub.add_parser("all", help="collect + fit + plot into one results directory")
  s.add_argument("plan")
  s.add_argument("--out", help="results directory (default: the plan directory's parent)")
  s.add_argument("--bootstrap", type=int, default=200)
  s.add_argument("--coarse-grid", action="store_true")
  s.add_argument("--title")
  s.set_defaults(fn=_all)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  setup_logging()
  args = _parser().parse_args(argv)
  try:
    return args.fn(args) or 0
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
