"""Fit a collected sweep table: Approaches 1-3 per family and the compute multipliers.

The glue between the table columns written by `collect` and the numeric fits of `fit`; used by
`python -m mdlm.scaling fit` and the scaling notebook.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mdlm.scaling.collect import fit_rows
from mdlm.scaling.fit import EnvelopeFit, IsoFLOPFit, ParametricFit, compute_multiplier, \
    fit_envelope, fit_from_dict, fit_isoflop, fit_parametric, summarize


def fit_sweep(rows: Sequence[dict], *, curves: Optional[Sequence[dict]] = None,
              bootstrap: int = 200, seed: int = 0, ci: float = 0.95,
              loss_key: str = "final_val_loss", grid=None, parametric: bool = True,
              target: str = "mdlm", reference: str = "ar", envelope_bins: int = 20,
              echo=print) -> dict:
  """Returns {"families": {name: {"approach1", "approach2", "approach3", "runs"}},
  "multiplier": {...}, "excluded": [...], "seconds": {...}} with fit objects inside."""
  usable = fit_rows(rows, loss=loss_key)
  used = {id(r) for r in usable}
  excluded = [{"run_dir": r["run_dir"], "status": r["status"], "message": r.get("message")}
              for r in rows if id(r) not in used]
  if not usable:
    raise ValueError("no finished run with a validation loss in the table (empty for fitting); "
                     f"statuses: {sorted({r['status'] for r in rows})}")
  families = sorted({r["family"] for r in usable})
  out = {"families": {}, "excluded": excluded, "seconds": {}, "ci_level": ci,
         "bootstrap": bootstrap, "loss": loss_key}
  for name in families:
    fam = [r for r in usable if r["family"] == name]
    N = np.array([r["N"] for r in fam], np.float64)
    D = np.array([r["D"] for r in fam], np.float64)
    L = np.array([r[loss_key] for r in fam], np.float64)
    budget = np.array([r["budget"] if r["budget"] is not None else r["C"] for r in fam])
    res = {"runs": len(fam)}
    t0 = time.perf_counter()
    res["approach2"] = fit_isoflop(N, L, budget, bootstrap=bootstrap, seed=seed, ci=ci)
    out["seconds"][f"{name}/approach2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pts = [c for c in (curves or []) if c["family"] == name and math.isfinite(c["loss"])]
    if pts:
      res["approach1"] = fit_envelope([c["C"] for c in pts], [c["loss"] for c in pts],
                                      N=[c["N"] for c in pts], D=[c["D"] for c in pts],
                                      num_bins=envelope_bins, bootstrap=bootstrap, seed=seed,
                                      ci=ci)
      res["approach1_source"] = f"{len(pts)} evaluations along the training curves"
    else:
      res["approach1"] = fit_envelope(6.0 * N * D, L, N=N, D=D, bootstrap=bootstrap, seed=seed,
                                      ci=ci)
      res["approach1_source"] = "final evaluations"
    out["seconds"][f"{name}/approach1"] = time.perf_counter() - t0
    if parametric and len(fam) >= 5:
      t0 = time.perf_counter()
      res["approach3"] = fit_parametric(N, D, L, grid=grid, bootstrap=bootstrap, seed=seed, ci=ci)
      out["seconds"][f"{name}/approach3"] = time.perf_counter() - t0
    echo(f"{name}: {len(fam)} runs fitted "
         f"(a = {res['approach2'].a:.3f}, c = {res['approach2'].c:.4f})")
    out["families"][name] = res
  if target in out["families"] and reference in out["families"]:
    fa, fb = out["families"][target], out["families"][reference]
    Cs = [b["C"] for b in fb["approach2"].budgets]
    grid_C = [float(c) for c in Cs]
    out["multiplier"] = {
        "target": target, "reference": reference,
        "approach2": compute_multiplier(fa["approach2"], fb["approach2"], compute=grid_C, ci=ci),
        "approach1": compute_multiplier(fa["approach1"], fb["approach1"], compute=grid_C, ci=ci),
    }
    if "approach3" in fa and "approach3" in fb:
      out["multiplier"]["approach3"] = compute_multiplier(fa["approach3"], fb["approach3"],
                                                          compute=grid_C, ci=ci)
  return out


def to_json(result: dict, path: str | Path, *, samples: bool = True) -> Path:
  """fits.json: every fit (with its bootstrap replicates) and a flat summary with intervals."""
  def enc(v):
    if isinstance(v, (IsoFLOPFit, EnvelopeFit, ParametricFit)):
      return enc(v.to_dict(samples))
    if hasattr(v, "to_dict"):
      return enc(v.to_dict())
    if isinstance(v, dict):
      return {k: enc(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [enc(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
      v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
      return None  # e.g. the intervals of a fit without bootstrap
    return v
  data = enc(result)
  data["summary"] = enc(summary_table(result))
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1, allow_nan=False, default=float))
  return path


def load_json(path: str | Path) -> dict:
  data = json.loads(Path(path).read_text())
  for res in data["families"].values():
    for key in ("approach1", "approach2", "approach3"):
      if key in res:
        res[key] = fit_from_dict(_nan_back(res[key]))
  return data


def _nan_back(v):
  if v is None:
    return math.nan
  if isinstance(v, dict):
    return {k: _nan_back(x) for k, x in v.items()}
  if isinstance(v, list):
    return [_nan_back(x) for x in v]
  return v


def summary_table(result: dict) -> list[dict]:
  """Flat rows: family, approach, quantity, estimate, lo, hi."""
  rows = []
  for name, res in result["families"].items():
    for key in ("approach1", "approach2", "approach3"):
      if key in res:
        for q, (v, lo, hi) in summarize(res[key]).items():
          rows.append({"family": name, "approach": key, "quantity": q, "estimate": v, "lo": lo,
                       "hi": hi})
  for key, m in (result.get("multiplier") or {}).items():
    if key in ("target", "reference"):
      continue
    m = m if isinstance(m, dict) else m.to_dict()
    for C, v, (lo, hi) in zip(m["compute"], m["multiplier"], m["ci"]):
      rows.append({"family": f"{result['multiplier']['target']}/"
                             f"{result['multiplier']['reference']}",
                   "approach": key, "quantity": f"compute_multiplier@C={C:.3g}", "estimate": v,
                   "lo": lo, "hi": hi})
  return rows


def format_summary(rows: list[dict]) -> str:
  lines = [f"{'family':10s} {'approach':10s} {'quantity':32s} {'estimate':>11s}  interval"]
  for r in rows:
    lines.append(f"{r['family']:10s} {r['approach']:10s} {r['quantity']:32s} "
                 f"{_fmt(r['estimate']):>11s}  [{_fmt(r['lo'])}, {_fmt(r['hi'])}]")
  return "\n".join(lines)


def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "nan"
  return f"{v:.4g}"
