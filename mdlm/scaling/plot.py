"""Scaling plots (matplotlib, saved as PNG and SVG).

- `plot_isoflop`: loss against N for each budget, with the fitted parabolas and their vertices.
- `plot_frontier`: compute-optimal loss against C for several families, fitted laws with their
  bootstrap bands, every run in the background.
- `plot_optimal_size`: N_opt against C with its power law.
- `plot_sweep`: the figure of a two-family sweep: IsoFLOP panels side by side, the frontier and
  N_opt(C).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

from mdlm.scaling.fit import IsoFLOPFit, ParametricFit, PowerLaw

FAMILY_COLORS = {"mdlm": "tab:blue", "ar": "tab:orange"}


def save(fig, stem: str | Path) -> list[Path]:
  """Writes stem.png (150 dpi) and stem.svg; returns both paths."""
  stem = Path(stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
  fig.savefig(paths[0], dpi=150, bbox_inches="tight")
  # A fixed hash salt and no date keep the SVG byte-identical across runs (diffable).
  with plt.rc_context({"svg.hashsalt": "mdlm-scaling"}):
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
  return paths


def _law_band(ax, law: PowerLaw, C: np.ndarray, color, label: Optional[str], level: float):
  ax.plot(C, law(C), color=color, lw=1.5, label=label)
  if law.num_replicates >= 10:
    draws = np.array([law(C, r) for r in range(law.num_replicates)])
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
    ax.fill_between(C, lo, hi, color=color, alpha=0.15, lw=0)


def plot_isoflop(ax, rows: Sequence[dict], fit: IsoFLOPFit, *, title: str = "",
                 loss_key: str = "final_val_loss"):
  """Loss vs N per budget (points), the parabolas in ln N and their vertices (stars)."""
  budgets = [b["C"] for b in fit.budgets]
  cmap = plt.get_cmap("viridis")
  for i, b in enumerate(fit.budgets):
    color = cmap(i / max(1, len(budgets) - 1))
    pts = [r for r in rows if r["budget"] == b["C"]]
    N = np.array([r["N"] for r in pts], np.float64)
    L = np.array([r[loss_key] for r in pts], np.float64)
    ax.scatter(N, L, color=color, s=18, zorder=3, label=f"C={b['C']:.2g}")
    lnN = np.linspace(np.log(N.min()) - 0.3, np.log(N.max()) + 0.3, 100)
    ax.plot(np.exp(lnN), np.polyval(b["parabola"], lnN - b["parabola_center_lnN"]), color=color,
            lw=1)
    if b["convex"]:
      ax.scatter([b["N_opt"]], [b["L_opt"]], marker="*", s=120, color=color, edgecolor="k",
                 zorder=4)
  ax.set_xscale("log")
  ax.set_xlabel("non-embedding parameters N")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title or "IsoFLOP curves")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")


def _plain_log_ticks(axis):
  """Decimal labels on a log axis spanning less than a decade (e.g. losses 2.5 ... 3.5)."""
  axis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
  axis.set_minor_formatter(ticker.FormatStrFormatter("%.2g"))


def _compute_range(fits: dict) -> np.ndarray:
  Cs = [b["C"] for f in fits.values() if isinstance(f, IsoFLOPFit) for b in f.budgets]
  lo, hi = (min(Cs), max(Cs)) if Cs else (1e18, 1e22)
  return np.geomspace(lo / 2, hi * 2, 100)


def plot_frontier(ax, fits: dict[str, IsoFLOPFit], *, rows: Sequence[dict] = (),
                  parametric: Optional[dict[str, ParametricFit]] = None,
                  loss_key: str = "final_val_loss", level: float = 0.95):
  """Compute-optimal loss vs C: IsoFLOP vertices (with bootstrap intervals), L_opt = k C^c with
  its band, the Approach-3 frontier (dashed) and every run (faint)."""
  C = _compute_range(fits)
  for name, fit in fits.items():
    color = FAMILY_COLORS.get(name, None)
    runs = [r for r in rows if r["family"] == name and r.get(loss_key) is not None]
    if runs:
      ax.scatter([r["C"] for r in runs], [r[loss_key] for r in runs], s=8, alpha=0.3,
                 color=color)
    ok = [b for b in fit.budgets if b["convex"]]
    yerr = np.array([[b["L_opt"] - b["L_opt_ci"][0], b["L_opt_ci"][1] - b["L_opt"]]
                     for b in ok]).T if ok and np.isfinite(ok[0]["L_opt_ci"][0]) else None
    ax.errorbar([b["C"] for b in ok], [b["L_opt"] for b in ok], yerr=yerr, fmt="o", color=color,
                ms=5, capsize=2)
    law = fit.laws["L_opt"]
    _law_band(ax, law, C, color, f"{name}: L = {law.coefficient:.3g} C^{law.exponent:.3f}", level)
    if parametric and name in parametric:
      ax.plot(C, parametric[name].frontier_loss(C), color=color, ls="--", lw=1,
              label=f"{name}: Approach 3")
  ax.set_xscale("log")
  ax.set_yscale("log")
  _plain_log_ticks(ax.yaxis)
  ax.set_xlabel("training compute C = 6 N D (FLOPs)")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Compute-optimal frontier")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")


def plot_optimal_size(ax, fits: dict[str, IsoFLOPFit], *, level: float = 0.95):
  C = _compute_range(fits)
  vertices = [b["N_opt"] for f in fits.values() for b in f.budgets if b["convex"]]
  for name, fit in fits.items():
    color = FAMILY_COLORS.get(name, None)
    ok = [b for b in fit.budgets if b["convex"]]
    N = np.array([b["N_opt"] for b in ok])
    ci = np.array([b["N_opt_ci"] for b in ok], np.float64)
    yerr = np.abs(np.stack([N - ci[:, 0], ci[:, 1] - N])) if np.all(np.isfinite(ci)) else None
    ax.errorbar([b["C"] for b in ok], N, yerr=yerr, fmt="s", color=color, ms=5, capsize=2)
    law = fit.laws["N_opt"]
    _law_band(ax, law, C, color, f"{name}: N_opt ~ C^{law.exponent:.2f}", level)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute C (FLOPs)")
  if vertices:  # wide bootstrap intervals should not squash the estimates into a line
    ax.set_ylim(min(vertices) / 10, max(vertices) * 10)
  ax.set_ylabel("compute-optimal N")
  ax.set_title("Optimal model size")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")


def plot_sweep(rows: Sequence[dict], fits: dict[str, IsoFLOPFit], stem: str | Path, *,
               parametric: Optional[dict[str, ParametricFit]] = None, title: str = "",
               loss_key: str = "final_val_loss") -> list[Path]:
  """The two-family figure: one IsoFLOP panel per family, then the frontier and N_opt(C)."""
  names = list(fits)
  fig, axes = plt.subplots(1, len(names) + 2, figsize=(4.6 * (len(names) + 2), 4.2))
  for ax, name in zip(axes, names):
    fam_rows = [r for r in rows if r["family"] == name]
    plot_isoflop(ax, fam_rows, fits[name], title=f"{name.upper()} IsoFLOP", loss_key=loss_key)
  plot_frontier(axes[len(names)], fits, rows=rows, parametric=parametric, loss_key=loss_key)
  plot_optimal_size(axes[len(names) + 1], fits)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  paths = save(fig, stem)
  plt.close(fig)
  return paths
