"""Validate the scaling-law fits on published laws, and time a full Approach-3 fit.

Points are generated from two published parametric laws L(N, D) = E + A / N^alpha + B / D^beta
over a Chinchilla-like IsoFLOP design (9 budgets from 6e18 to 3e21 FLOPs, 12 sizes per budget
spread 6x either side of D / N = 20; C = 6 N D), with and without 1% multiplicative noise:
  - Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), Approach 3:
    E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28;
  - Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"):
    E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658.
Each is fitted by Approach 3 (Huber delta 1e-3 on log residuals, L-BFGS-B from the 4500-start
grid), Approach 2 (IsoFLOP parabolas) and Approach 1 (envelope), and the recovered values are
printed next to the truth. The noiseless fit is repeated to give a median wall time.

  python experiments/scaling/validate_published.py [--repeats 3]
      [--bootstrap 200] [--out experiments/scaling/published_validation.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled

import numpy as np  # noqa: E402

from mdlm.scaling import fit as F  # noqa: E402

LAWS = {
    "hoffmann2022": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "besiroglu2024": dict(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}


def design(budgets=np.geomspace(6e18, 3e21, 9), per_budget=12, spread=6.0):
  N, D, C = [], [], []
  for c in budgets:
    mid = math.sqrt(c / (6 * 20))
    for n in np.geomspace(mid / spread, mid * spread, per_budget):
      N.append(n)
      D.append(c / (6 * n))
      C.append(c)
  return np.array(N), np.array(D), np.array(C)


def law(N, D, E, A, B, alpha, beta):
  return E + A / N ** alpha + B / D ** beta


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--bootstrap", type=int, default=200)
  p.add_argument("--noise", type=float, default=0.01)
  p.add_argument("--out", default="experiments/scaling/published_validation.json")
  args = p.parse_args()
  N, D, C = design()
  rng = np.random.default_rng(0)
  report = {"design": {"points": int(len(N)), "budgets": sorted(set(C.tolist())),
                       "N_range": [float(N.min()), float(N.max())]}, "laws": {}}
  for name, truth in LAWS.items():
    a_true = truth["beta"] / (truth["alpha"] + truth["beta"])
    L = law(N, D, **truth)
    times, fit = [], None
    for _ in range(max(1, args.repeats)):
      t0 = time.perf_counter()
      fit = F.fit_parametric(N, D, L)
      times.append(time.perf_counter() - t0)
    noisy_L = L * np.exp(args.noise * rng.standard_normal(len(L)))
    t0 = time.perf_counter()
    noisy = F.fit_parametric(N, D, noisy_L, bootstrap=args.bootstrap, seed=1)
    noisy_seconds = time.perf_counter() - t0
    iso = F.fit_isoflop(N, L, C)
    iso_noisy = F.fit_isoflop(N, noisy_L, C, bootstrap=args.bootstrap, seed=2)
    env = F.fit_envelope(6 * N * D, L, N=N, D=D)
    ci = noisy.ci
    entry = {
        "truth": truth, "a_true": a_true,
        "exact": {**fit.params, "a": fit.a, "objective": fit.objective,
                  "starts": fit.num_starts, "starts_at_best": fit.num_at_best,
                  "seconds_median": statistics.median(times), "seconds": times},
        "noisy": {"noise": args.noise, **{k: [v, *ci[k]] for k, v in
                                          {**noisy.params, **noisy.derived}.items()},
                  "seconds_with_bootstrap": noisy_seconds, "fit_seconds": noisy.fit_seconds,
                  "bootstrap": args.bootstrap},
        "approach2": {"a": iso.a, "a_noisy": [iso_noisy.a, *iso_noisy.laws["N_opt"].ci["exponent"]]},
        "approach1": {"a": env.laws["N_opt"].exponent, "envelope_points": len(env.points)},
    }
    report["laws"][name] = entry
    print(f"\n== {name}: {len(N)} points, truth {truth}, a = beta/(alpha+beta) = {a_true:.4f}")
    print(f"{'':8s} {'truth':>9s} {'exact fit':>11s} {'1% noise':>9s}  95% bootstrap interval")
    for k in ("E", "A", "B", "alpha", "beta"):
      v, lo, hi = entry["noisy"][k]
      print(f"{k:8s} {truth[k]:9.4g} {fit.params[k]:11.6g} {v:9.4g}  [{lo:.4g}, {hi:.4g}]"
            f"{'' if lo <= truth[k] <= hi else '  (truth outside)'}")
    v, lo, hi = entry["noisy"]["a"]
    print(f"{'a':8s} {a_true:9.4f} {fit.a:11.6f} {v:9.4f}  [{lo:.4f}, {hi:.4f}]")
    print(f"Approach 2 a = {iso.a:.4f} (noisy {iso_noisy.a:.4f} "
          f"[{iso_noisy.laws['N_opt'].ci['exponent'][0]:.4f}, "
          f"{iso_noisy.laws['N_opt'].ci['exponent'][1]:.4f}]); "
          f"Approach 1 a = {env.laws['N_opt'].exponent:.4f} over {len(env.points)} envelope points")
    print(f"full Approach-3 fit ({fit.num_starts} starts, {fit.num_at_best} reach the best): "
          f"median {statistics.median(times):.1f} s over {len(times)} runs {[round(t, 1) for t in times]}; "
          f"noisy fit {noisy.fit_seconds:.1f} s + {args.bootstrap} bootstrap refits "
          f"{noisy.bootstrap_seconds:.1f} s")
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\n-> {args.out}")


if __name__ == "__main__":
  main()
