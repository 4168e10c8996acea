"""python -m mdlm.scaling {plan, launch, collect, fit, plot, all} ...

  plan    RECIPE.yaml --out PLAN_DIR        IsoFLOP grid -> jobs.jsonl, jobs.csv, sweep.sh, hydra/
  launch  PLAN_DIR [--dry-run] [--hours H]  run unfinished jobs one by one (finished are skipped)
  collect PLAN_DIR|SWEEP_DIR --out results.csv [--curves-out curves.csv]
  fit     results.csv --out fits.json [--bootstrap 200] [--curves curves.csv]
  plot    results.csv fits.json --out STEM  (STEM.png and STEM.svg)
  all     PLAN_DIR --out RESULTS_DIR        collect + fit + plot
"""

from __future__ import annotations

import os

# L-BFGS-B runs thousands of tiny optimisations; one BLAS thread is much faster (see fit.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def _plan(args):
  from mdlm.scaling.plan import SweepRecipe, plan_sweep, write_plan
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
        f"{total:.3g} FLOPs ({recipe.flops}) -> {out}")
  print(f"{'job':34s} {'N':>10s} {'steps':>7s} {'tokens':>10s} {'C/budget':>9s} flags")
  for j in jobs:
    print(f"{j.job_id:34s} {j.N:10,d} {j.steps:7d} {j.tokens:10,d} {j.compute / j.budget:9.4f} "
          f"{','.join(j.flags)}")
  for s in skipped:
    print(f"skipped {s['kind']} C={s['budget']:g} {s['size']}: {s['reason']}")


def _launch(args):
  from mdlm.scaling.launch import launch
  from mdlm.scaling.plan import load_jobs
  jobs = load_jobs(args.plan)
  if args.only:
    jobs = [j for j in jobs if j.family == args.only or j.kind == args.only]
  if args.order == "budget":
    # Interleave the families budget by budget, so a sweep cut short has comparable coverage.
    jobs.sort(key=lambda j: (j.budget, j.N, j.family))
  deadline = time.time() + args.hours * 3600 if args.hours else None
  extra = list(args.extra or [])
  t0 = time.time()
  result = launch(jobs, extra=extra, dry_run=args.dry_run, stop_on_error=args.stop_on_error,
                  max_jobs=args.max_jobs, deadline=deadline)
  print(json.dumps({k: len(v) for k, v in result.items()}), f"in {time.time() - t0:.0f}s")
  if result["failed"]:
    print("failed:", ", ".join(result["failed"]))
  return 1 if result["failed"] else 0


def _collect(args):
  from mdlm.scaling.collect import collect_runs, read_curves, status_counts, write_csv, \
      write_curves_csv
  rows = collect_runs(args.paths)
  path = write_csv(rows, args.out)
  print(f"{len(rows)} runs -> {path}: {status_counts(rows)}")
  if args.curves_out:
    curves = read_curves(rows)
    print(f"{len(curves)} evaluations along the training curves -> "
          f"{write_curves_csv(curves, args.curves_out)}")
  for r in rows:
    if r["status"] != "finished":
      print(f"  {r['status']:12s} {r['job_id'] or r['run_dir']}: {(r['message'] or '')[:100]}")


def _fit(args):
  from mdlm.scaling.analyze import fit_sweep, format_summary, to_json
  from mdlm.scaling.collect import read_csv, read_curves
  rows = read_csv(args.table)
  curves = None
  if args.curves:
    from mdlm.scaling.collect import read_curves_csv
    curves = read_curves_csv(args.curves) if args.curves != "runs" else read_curves(rows)
  grid = None
  if args.coarse_grid:
    from mdlm.scaling.fit import chinchilla_grid
    grid = chinchilla_grid()[::7]
  t0 = time.time()
  result = fit_sweep(rows, curves=curves, bootstrap=args.bootstrap, seed=args.seed, ci=args.ci,
                     grid=grid, parametric=not args.no_parametric)
  result["seconds"]["total"] = time.time() - t0
  path = to_json(result, args.out)
  from mdlm.scaling.analyze import summary_table
  print(format_summary(summary_table(result)))
  print("seconds:", {k: round(v, 1) for k, v in result["seconds"].items()})
  print(f"-> {path}")


def _plot(args):
  import matplotlib
  matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
  from mdlm.scaling.analyze import load_json
  from mdlm.scaling.collect import read_csv
  from mdlm.scaling.plot import plot_sweep
  rows = read_csv(args.table)
  fits = load_json(args.fits)
  iso = {k: v["approach2"] for k, v in fits["families"].items()}
  par = {k: v["approach3"] for k, v in fits["families"].items() if "approach3" in v}
  paths = plot_sweep(rows, iso, args.out, parametric=par, title=args.title or "")
  print("->", ", ".join(map(str, paths)))


def _all(args):
  out = Path(args.out)
  _collect(argparse.Namespace(paths=[args.plan], out=out / "results.csv",
                              curves_out=out / "curves.csv"))
  _fit(argparse.Namespace(table=out / "results.csv", out=out / "fits.json",
                          bootstrap=args.bootstrap, seed=0, ci=0.95, curves=out / "curves.csv",
                          coarse_grid=args.coarse_grid, no_parametric=False))
  _plot(argparse.Namespace(table=out / "results.csv", fits=out / "fits.json",
                           out=out / "scaling", title=args.title))


def main(argv=None) -> int:
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
  s = sub.add_parser("collect", help="run directories -> results.csv")
  s.add_argument("paths", nargs="+", help="plan directories (jobs.jsonl) and/or sweep dirs")
  s.add_argument("--out", required=True)
  s.add_argument("--curves-out", help="also write every evaluation event (for Approach 1)")
  s.set_defaults(fn=_collect)
  s = sub.add_parser("fit", help="results.csv -> fits.json (Approaches 1-3, multiplier)")
  s.add_argument("table")
  s.add_argument("--out", required=True)
  s.add_argument("--bootstrap", type=int, default=200)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--ci", type=float, default=0.95)
  s.add_argument("--curves", help="Approach 1 over every evaluation along the training curves: "
                 "a curves CSV written by `collect --curves-out`, or 'runs' to read the run dirs")
  s.add_argument("--coarse-grid", action="store_true",
                 help="Approach 3 from every 7th start of the 4500-start grid")
  s.add_argument("--no-parametric", action="store_true")
  s.set_defaults(fn=_fit)
  s = sub.add_parser("plot", help="results.csv + fits.json -> STEM.png / STEM.svg")
  s.add_argument("table")
  s.add_argument("fits")
  s.add_argument("--out", required=True, help="output stem (no suffix)")
  s.add_argument("--title")
  s.set_defaults(fn=_plot)
  s = sub.add_parser("all", help="collect + fit + plot into one results directory")
  s.add_argument("plan")
  s.add_argument("--out", required=True)
  s.add_argument("--bootstrap", type=int, default=200)
  s.add_argument("--coarse-grid", action="store_true")
  s.add_argument("--title")
  s.set_defaults(fn=_all)
  args = p.parse_args(argv)
  try:
    return args.fn(args) or 0
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
