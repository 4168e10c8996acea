"""Scaling-law fits: the three approaches of Hoffmann et al. 2022 ("Training Compute-Optimal Large
Language Models"), bootstrap intervals, and the compute multiplier between two model families.

- Approach 1, `fit_envelope`: the lower envelope of loss against compute; power laws
  N_opt ~ C^a, D_opt ~ C^b, L ~ C^c through the envelope points.
- Approach 2, `fit_isoflop`: per budget C a parabola of loss in ln N through the IsoFLOP points;
  its vertex gives N_opt(C), D_opt = C / (6 N_opt) and L_opt(C); then power laws in C.
- Approach 3, `fit_parametric`: L(N, D) = E + A / N^alpha + B / D^beta, fitted as
  log L = LSE(a - alpha log N, b - beta log D, e) with a Huber loss (delta 1e-3) on the log
  residuals, L-BFGS-B from a grid of starts (Hoffmann et al. 2022; Besiroglu et al. 2024,
  "Chinchilla Scaling: A replication attempt").
- `compute_multiplier`: how much more compute family A needs than family B to reach the loss that
  B reaches with compute C (SMDM, Nie et al. 2024, report about 16x for MDM over AR).

Every fitted quantity gets a percentile bootstrap interval when `bootstrap > 0`. Losses are
per-token losses in nats (the fits are unit-free in N, D, C).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Optional

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

# ---------------------------------------------------------------------------------------------
# Input checks.


def _positive(name: str, x, *, what: str = "") -> np.ndarray:
  x = np.asarray(x, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError(f"{name} is empty: there is nothing to fit. Collect finished runs with a "
                     "validation loss first (see `python -m mdlm.scaling collect`).")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(x)))} non-finite values; drop "
                     "unfinished or failed runs before fitting.")
  if np.any(x <= 0):
    raise ValueError(f"{name} must be strictly positive{what}; got min {x.min():g}. Check the "
                     "collected table (N, D, C and losses are all > 0 for a valid run).")
  return x


def _same_length(**arrays) -> int:
  lengths = {k: len(v) for k, v in arrays.items() if v is not None}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"inputs differ in length: {lengths}")
  return next(iter(lengths.values()))


def _ci(samples: np.ndarray, level: float) -> tuple[float, float]:
  samples = np.asarray(samples, dtype=np.float64)
  samples = samples[np.isfinite(samples)]
  if samples.size < 2:
    return (math.nan, math.nan)
  lo, hi = np.percentile(samples, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
  return (float(lo), float(hi))


def _check_bootstrap(bootstrap: int, level: float):
  if bootstrap < 0:
    raise ValueError(f"bootstrap={bootstrap} must be >= 0")
  if not 0.0 < level < 1.0:
    raise ValueError(f"ci={level} must lie in (0, 1), e.g. 0.95")


# ---------------------------------------------------------------------------------------------
# BLAS threads. L-BFGS-B calls BLAS on 5-vectors; a multi-threaded OpenBLAS wakes its thread
# pool for each call, which made a 4500-start fit ~20x slower on a busy 2-core machine. The
# optimisation therefore runs with one BLAS thread (`_minimize_from`, via threadpoolctl).


# ---------------------------------------------------------------------------------------------
# Power laws y = k x^p, fitted by least squares in log-log space.


@dataclasses.dataclass
class PowerLaw:
  """y = coefficient * x^exponent, with bootstrap replicates of (coefficient, exponent)."""

  coefficient: float
  exponent: float
  coefficient_samples: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
  exponent_samples: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
  ci_level: float = 0.95

  def _params(self, replicate: Optional[int]):
    if replicate is None:
      return self.coefficient, self.exponent
    return self.coefficient_samples[replicate], self.exponent_samples[replicate]

  def __call__(self, x, replicate: Optional[int] = None):
    k, p = self._params(replicate)
    with np.errstate(over="ignore", invalid="ignore"):
      return k * np.asarray(x, dtype=np.float64) ** p

  def inverse(self, y, replicate: Optional[int] = None):
    k, p = self._params(replicate)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
      return (np.asarray(y, dtype=np.float64) / k) ** (1.0 / p)

  @property
  def num_replicates(self) -> int:
    return len(self.exponent_samples)

  @property
  def ci(self) -> dict[str, tuple[float, float]]:
    return {"coefficient": _ci(self.coefficient_samples, self.ci_level),
            "exponent": _ci(self.exponent_samples, self.ci_level)}

  def to_dict(self, samples: bool = True) -> dict:
    d = {"coefficient": self.coefficient, "exponent": self.exponent, "ci": self.ci,
         "ci_level": self.ci_level}
    if samples:
      d["coefficient_samples"] = [float(v) for v in self.coefficient_samples]
      d["exponent_samples"] = [float(v) for v in self.exponent_samples]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "PowerLaw":
    return cls(coefficient=d["coefficient"], exponent=d["exponent"],
               coefficient_samples=np.asarray(d.get("coefficient_samples", []), np.float64),
               exponent_samples=np.asarray(d.get("exponent_samples", []), np.float64),
               ci_level=d.get("ci_level", 0.95))


def _loglog(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(coefficient, exponent) of the least-squares line log y = exponent log x + log coefficient."""
  lx, ly = np.log(x), np.log(y)
  if np.ptp(lx) == 0:
    raise ValueError("a power law needs at least two distinct x values")
  slope, intercept = np.polyfit(lx, ly, 1)
  with np.errstate(over="ignore"):  # a wild bootstrap replicate may overflow to inf
    return float(np.exp(intercept)), float(slope)


def fit_power_law(x, y, *, bootstrap: int = 0, seed: int = 0, ci: float = 0.95) -> PowerLaw:
  """y = k x^p by least squares in log space; case-bootstrap replicates when bootstrap > 0."""
  _check_bootstrap(bootstrap, ci)
  x, y = _positive("x", x), _positive("y", y)
  _same_length(x=x, y=y)
  k, p = _loglog(x, y)
  ks, ps = [], []
  rng = np.random.default_rng(seed)
  for _ in range(bootstrap):
    idx = rng.integers(0, len(x), len(x))
    if np.ptp(np.log(x[idx])) == 0:
      continue
    kb, pb = _loglog(x[idx], y[idx])
    ks.append(kb)
    ps.append(pb)
  return PowerLaw(k, p, np.asarray(ks), np.asarray(ps), ci)


# ---------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas.


def fit_parabola(x, y) -> tuple[np.ndarray, float]:
  """Least-squares y = c2 u^2 + c1 u + c0 with u = x - mid (centred for conditioning).
  Returns ([c2, c1, c0], mid)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(np.unique(x)) < 3:
    raise ValueError(f"a parabola needs >= 3 distinct x values, got {len(np.unique(x))}")
  mid = float(np.mean(x))
  return np.polyfit(x - mid, y, 2), mid


def parabola_vertex(x, y) -> tuple[float, float, float]:
  """Least-squares parabola through (x, y); returns (x*, y*, c2) at its vertex (x* = mid -
  c1 / (2 c2), y* = c0 - c1^2 / (4 c2)). c2 <= 0 means no minimum: x* and y* are then nan."""
  (c2, c1, c0), mid = fit_parabola(x, y)
  if c2 <= 0:
    return math.nan, math.nan, float(c2)
  u = -c1 / (2.0 * c2)
  return float(u + mid), float(c0 - c1 * c1 / (4.0 * c2)), float(c2)


class _LossFrontier:
  """The loss-vs-compute frontier shared by fits that hold an "L_opt" power law in `laws`."""

  @property
  def c(self) -> float:
    return self.laws["L_opt"].exponent

  def frontier_loss(self, C, replicate: Optional[int] = None):
    return self.laws["L_opt"](C, replicate)

  def compute_for_loss(self, loss, replicate: Optional[int] = None):
    return self.laws["L_opt"].inverse(loss, replicate)

  @property
  def num_replicates(self) -> int:
    return self.laws["L_opt"].num_replicates


@dataclasses.dataclass
class IsoFLOPFit(_LossFrontier):
  """Per-budget parabola vertices and the power laws through them."""

  budgets: list[dict]               # one dict per budget: C, N_opt, D_opt, L_opt, curvature, ...
  laws: dict[str, PowerLaw]         # "N_opt", "D_opt", "L_opt" as functions of C
  ci_level: float = 0.95
  bootstrap: int = 0
  bootstrap_method: str = "residuals"
  bootstrap_kept: int = 0

  @property
  def a(self) -> float:
    return self.laws["N_opt"].exponent

  @property
  def b(self) -> float:
    return self.laws["D_opt"].exponent


  def summary(self) -> dict:
    out = {}
    for name, law in self.laws.items():
      out[f"{name}_exponent"] = (law.exponent, *law.ci["exponent"])
      out[f"{name}_coefficient"] = (law.coefficient, *law.ci["coefficient"])
    return out

  def to_dict(self, samples: bool = True) -> dict:
    return {"approach": 2, "budgets": self.budgets,
            "laws": {k: v.to_dict(samples) for k, v in self.laws.items()},
            "ci_level": self.ci_level, "bootstrap": self.bootstrap,
            "bootstrap_method": self.bootstrap_method, "bootstrap_kept": self.bootstrap_kept}

  @classmethod
  def from_dict(cls, d: dict) -> "IsoFLOPFit":
    return cls(budgets=d["budgets"], laws={k: PowerLaw.from_dict(v) for k, v in d["laws"].items()},
               ci_level=d["ci_level"], bootstrap=d["bootstrap"],
               bootstrap_method=d["bootstrap_method"], bootstrap_kept=d["bootstrap_kept"])


def _isoflop_core(logN: np.ndarray, loss: np.ndarray, groups: list[np.ndarray],
                  budgets: np.ndarray):
  """Vertices per group, then log-log laws over the convex groups. Returns (rows, laws|None)."""
  rows = []
  for C, idx in zip(budgets, groups):
    x_opt, l_opt, curv = parabola_vertex(logN[idx], loss[idx])
    coef, mid = fit_parabola(logN[idx], loss[idx])
    lo, hi = logN[idx].min(), logN[idx].max()
    convex = curv > 0
    rows.append({
        "C": float(C), "n_points": int(len(idx)), "curvature": curv, "convex": bool(convex),
        "parabola": [float(v) for v in coef], "parabola_center_lnN": mid,
        "N_opt": float(np.exp(x_opt)) if convex else math.nan,
        "D_opt": float(C / (6.0 * np.exp(x_opt))) if convex else math.nan,
        "L_opt": l_opt,
        "extrapolated": bool(convex and not lo <= x_opt <= hi),
        "min_observed_loss": float(loss[idx].min()),
    })
  ok = [r for r in rows if r["convex"] and r["L_opt"] > 0]
  if len(ok) < 2:
    return rows, None
  C = np.array([r["C"] for r in ok])
  laws = {name: _loglog(C, np.array([r[name] for r in ok])) for name in ("N_opt", "D_opt", "L_opt")}
  return rows, laws


def fit_isoflop(N, loss, budget, *, bootstrap: int = 0, method: str = "residuals", seed: int = 0,
                ci: float = 0.95) -> IsoFLOPFit:
  """Approach 2. N: non-embedding parameters, loss: final validation loss, budget: the planned
  compute C of each run (runs sharing a budget form one IsoFLOP curve, >= 3 sizes each).

  Bootstrap methods: "residuals" (default; the sizes are fixed by design, so losses are
  resampled as fitted value + a resampled pooled residual, inflated by sqrt(n / (n - p)) for the
  p parabola coefficients) or "cases" (resample runs within each budget).
  """
  _check_bootstrap(bootstrap, ci)
  if method not in ("residuals", "cases"):
    raise ValueError(f"method={method!r}; choose 'residuals' or 'cases'")
  N, loss, budget = _positive("N", N), _positive("loss", loss), _positive("C (budget)", budget)
  _same_length(N=N, loss=loss, budget=budget)
  budgets = np.unique(budget)
  groups = [np.flatnonzero(budget == C) for C in budgets]
  small = [float(C) for C, g in zip(budgets, groups) if len(np.unique(N[g])) < 3]
  if small:
    raise ValueError(f"budgets {small} have fewer than 3 distinct model sizes; an IsoFLOP "
                     "parabola needs >= 3 (plan >= 3 sizes per budget or drop those budgets).")
  logN = np.log(N)
  rows, laws = _isoflop_core(logN, loss, groups, budgets)
  if laws is None:
    raise ValueError("fewer than 2 budgets have a convex IsoFLOP curve (a minimum inside the "
                     f"fit); curvatures: {[r['curvature'] for r in rows]}. Widen the size range "
                     "around the optimum or add budgets.")

  rng = np.random.default_rng(seed)
  samples = {name: ([], []) for name in laws}
  budget_samples = [{"N_opt": [], "L_opt": []} for _ in rows]
  if bootstrap:
    fitted = np.empty_like(loss)
    for idx in groups:
      mid = logN[idx].mean()
      coef = np.polyfit(logN[idx] - mid, loss[idx], 2)
      fitted[idx] = np.polyval(coef, logN[idx] - mid)
    resid = loss - fitted
    dof = len(loss) - 3 * len(groups)
    if method == "residuals" and dof <= 0:
      raise ValueError("residual bootstrap needs more runs than parabola coefficients (> 3 sizes "
                       "on some budget); use method='cases' or add sizes.")
    if method == "residuals":
      resid = resid * math.sqrt(len(loss) / dof)
  kept = 0
  for _ in range(bootstrap):
    if method == "residuals":
      loss_b = fitted + rng.choice(resid, size=len(resid), replace=True)
      logN_b, groups_b = logN, groups
    else:
      picks = [rng.choice(idx, size=len(idx), replace=True) for idx in groups]
      if any(len(np.unique(logN[p])) < 3 for p in picks):
        continue
      order = np.concatenate(picks)
      logN_b, loss_b = logN[order], loss[order]
      starts = np.cumsum([0] + [len(p) for p in picks])
      groups_b = [np.arange(starts[i], starts[i + 1]) for i in range(len(picks))]
    if np.any(loss_b <= 0):
      continue
    rows_b, laws_b = _isoflop_core(logN_b, loss_b, groups_b, budgets)
    if laws_b is None:
      continue
    kept += 1
    for name, (k, p) in laws_b.items():
      samples[name][0].append(k)
      samples[name][1].append(p)
    for r, store in zip(rows_b, budget_samples):
      store["N_opt"].append(r["N_opt"])
      store["L_opt"].append(r["L_opt"])
  for r, store in zip(rows, budget_samples):
    r["N_opt_ci"] = _ci(np.array(store["N_opt"]), ci) if bootstrap else (math.nan, math.nan)
    r["L_opt_ci"] = _ci(np.array(store["L_opt"]), ci) if bootstrap else (math.nan, math.nan)
  power_laws = {name: PowerLaw(k, p, np.asarray(samples[name][0]), np.asarray(samples[name][1]),
                               ci) for name, (k, p) in laws.items()}
  return IsoFLOPFit(rows, power_laws, ci, bootstrap, method, kept)


# ---------------------------------------------------------------------------------------------
# Approach 1: lower envelope of loss vs compute.


def lower_envelope(C, loss, *, num_bins: Optional[int] = None) -> np.ndarray:
  """Indices of the envelope points.

  num_bins=None: the Pareto frontier (each point beats every point of smaller or equal compute).
  num_bins=k: k log-spaced compute bins, the lowest loss in each non-empty bin (as Hoffmann et
  al. did over training curves), then the Pareto filter."""
  C, loss = np.asarray(C, np.float64), np.asarray(loss, np.float64)
  cand = np.arange(len(C))
  if num_bins is not None:
    if num_bins < 1:
      raise ValueError(f"num_bins={num_bins} must be >= 1")
    edges = np.geomspace(C.min(), C.max() * (1 + 1e-12), num_bins + 1)
    which = np.clip(np.searchsorted(edges, C, side="right") - 1, 0, num_bins - 1)
    cand = np.array([np.flatnonzero(which == k)[np.argmin(loss[which == k])]
                     for k in range(num_bins) if np.any(which == k)])
  order = cand[np.lexsort((loss[cand], C[cand]))]
  keep, best = [], math.inf
  for i in order:
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  return np.asarray(keep, dtype=np.int64)


@dataclasses.dataclass
class EnvelopeFit(_LossFrontier):
  points: list[dict]                # the envelope points (C, loss, N, D)
  laws: dict[str, PowerLaw]         # "L_opt" and, when N / D were given, "N_opt", "D_opt"
  ci_level: float = 0.95
  bootstrap: int = 0
  bootstrap_kept: int = 0


  def to_dict(self, samples: bool = True) -> dict:
    return {"approach": 1, "points": self.points,
            "laws": {k: v.to_dict(samples) for k, v in self.laws.items()},
            "ci_level": self.ci_level, "bootstrap": self.bootstrap,
            "bootstrap_kept": self.bootstrap_kept}

  @classmethod
  def from_dict(cls, d: dict) -> "EnvelopeFit":
    return cls(points=d["points"], laws={k: PowerLaw.from_dict(v) for k, v in d["laws"].items()},
               ci_level=d["ci_level"], bootstrap=d["bootstrap"], bootstrap_kept=d["bootstrap_kept"])


def _envelope_core(C, loss, N, D, num_bins):
  idx = lower_envelope(C, loss, num_bins=num_bins)
  if len(idx) < 2 or np.ptp(np.log(C[idx])) == 0:
    return idx, None
  laws = {"L_opt": _loglog(C[idx], loss[idx])}
  if N is not None:
    laws["N_opt"] = _loglog(C[idx], N[idx])
  if D is not None:
    laws["D_opt"] = _loglog(C[idx], D[idx])
  return idx, laws


def fit_envelope(C, loss, *, N=None, D=None, num_bins: Optional[int] = None, bootstrap: int = 0,
                 seed: int = 0, ci: float = 0.95) -> EnvelopeFit:
  """Approach 1: power laws through the lower envelope of (C, loss) points (final points of
  runs, or every evaluation along the training curves). Case bootstrap over the points."""
  _check_bootstrap(bootstrap, ci)
  C, loss = _positive("C", C), _positive("loss", loss)
  N = None if N is None else _positive("N", N)
  D = None if D is None else _positive("D", D)
  _same_length(C=C, loss=loss, N=N, D=D)
  idx, laws = _envelope_core(C, loss, N, D, num_bins)
  if laws is None:
    raise ValueError(f"the envelope has {len(idx)} point(s) at distinct compute; need >= 2 "
                     "(add budgets or training-curve points).")
  rng = np.random.default_rng(seed)
  samples = {name: ([], []) for name in laws}
  kept = 0
  for _ in range(bootstrap):
    pick = rng.integers(0, len(C), len(C))
    _, laws_b = _envelope_core(C[pick], loss[pick], None if N is None else N[pick],
                               None if D is None else D[pick], num_bins)
    if laws_b is None:
      continue
    kept += 1
    for name, (k, p) in laws_b.items():
      samples[name][0].append(k)
      samples[name][1].append(p)
  points = [{"C": float(C[i]), "loss": float(loss[i]),
             "N": None if N is None else float(N[i]), "D": None if D is None else float(D[i])}
            for i in idx]
  power_laws = {name: PowerLaw(k, p, np.asarray(samples[name][0]), np.asarray(samples[name][1]),
                               ci) for name, (k, p) in laws.items()}
  return EnvelopeFit(points, power_laws, ci, bootstrap, kept)


# ---------------------------------------------------------------------------------------------
# Approach 3: the parametric law L(N, D) = E + A / N^alpha + B / D^beta.

PARAMETRIC_NAMES = ("E", "A", "B", "alpha", "beta")
DERIVED_NAMES = ("a", "b", "G")


def chinchilla_grid() -> np.ndarray:
  """Hoffmann et al.'s starting grid over (a, b, e, alpha, beta): alpha, beta in {0, .5, ..., 2},
  e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25}: 6 * 6 * 5 * 5 * 5 = 4500 starts."""
  alpha = np.arange(0.0, 2.01, 0.5)
  e = np.arange(-1.0, 1.01, 0.5)
  ab = np.arange(0.0, 25.01, 5.0)
  return np.array(list(itertools.product(ab, ab, e, alpha, alpha)), dtype=np.float64)


def _log_predict(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
  """theta [..., 5] = (a, b, e, alpha, beta) -> log L [..., n]."""
  theta = np.asarray(theta, np.float64)
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  terms = np.stack(np.broadcast_arrays(a - alpha * logN, b - beta * logD, e + 0 * logN), axis=0)
  return special.logsumexp(terms, axis=0)


def _objective(theta, logN, logD, logL, delta):
  """Mean Huber(delta) of the log residuals, divided by delta (so ~ mean |r| when |r| >> delta;
  the scaling keeps L-BFGS-B's stopping tests meaningful) and its gradient.

  Written with elementwise numpy ops (no generic logsumexp) because the grid of starts calls it
  ~10^5-10^6 times."""
  a, b, e, alpha, beta = theta
  t0 = a - alpha * logN
  t1 = b - beta * logD
  m = np.maximum(np.maximum(t0, t1), e)
  w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
  s = w0 + w1 + w2
  r = m + np.log(s) - logL                         # log-residual of LSE(t0, t1, e)
  scale = 1.0 / (len(r) * delta)
  absr = np.abs(r)
  value = np.sum(np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))) * scale
  dr = np.clip(r, -delta, delta) * (scale / s)     # Huber'(r) times the softmax denominator
  g0, g1 = dr * w0, dr * w1
  grad = np.array([g0.sum(), g1.sum(), (dr * w2).sum(), -(g0 @ logN), -(g1 @ logD)])
  return value, grad


def _batched_objective(thetas, logN, logD, logL, delta):
  r = _log_predict(thetas, logN, logD) - logL
  return np.sum(special.huber(delta, r), axis=-1) / (len(logL) * delta)


_LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-10}


def _minimize_from(starts, logN, logD, logL, delta):
  with threadpool_limits(limits=1, user_api="blas"):
    return _minimize_loop(starts, logN, logD, logL, delta)


def _minimize_loop(starts, logN, logD, logL, delta):
  best, results = None, []
  for x0 in starts:
    res = optimize.minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True,
                            method="L-BFGS-B", options=_LBFGS_OPTIONS)
    results.append((float(res.fun), res.x))
    if best is None or res.fun < best.fun:
      best = res
  return best, results


def _derived(params: dict) -> dict:
  """Compute-optimal allocation for C = 6 N D (Hoffmann et al. eq. 4):
  N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, a = beta / (alpha + beta), b = alpha / (alpha + beta),
  G = (alpha A / (beta B))^(1 / (alpha + beta))."""
  A, B, alpha, beta = params["A"], params["B"], params["alpha"], params["beta"]
  s = alpha + beta
  with np.errstate(all="ignore"):
    G = (alpha * A / (beta * B)) ** (1.0 / s) if alpha > 0 and beta > 0 else math.nan
  return {"a": beta / s if s else math.nan, "b": alpha / s if s else math.nan, "G": float(G)}


def _theta_to_params(theta) -> dict:
  a, b, e, alpha, beta = (float(v) for v in theta)
  return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


@dataclasses.dataclass
class ParametricFit:
  """L(N, D) = E + A / N^alpha + B / D^beta, plus the compute-optimal allocation it implies."""

  params: dict                       # E, A, B, alpha, beta
  derived: dict                      # a, b, G
  objective: float
  num_points: int
  num_starts: int
  num_at_best: int                   # starts that reached the best objective (within 1e-9 rel.)
  fit_seconds: float
  delta: float = 1e-3
  samples: dict = dataclasses.field(default_factory=dict)   # name -> bootstrap replicates
  ci_level: float = 0.95
  bootstrap: int = 0
  bootstrap_seconds: float = 0.0

  def __getattr__(self, name):
    # Only reached for names that are not fields: E, A, B, alpha, beta, a, b, G.
    state = self.__dict__
    if name in PARAMETRIC_NAMES and "params" in state:
      return state["params"][name]
    if name in DERIVED_NAMES and "derived" in state:
      return state["derived"][name]
    raise AttributeError(name)

  @property
  def ci(self) -> dict[str, tuple[float, float]]:
    return {k: _ci(np.asarray(v), self.ci_level) for k, v in self.samples.items()}

  def _p(self, replicate):
    if replicate is None:
      return {**self.params, **self.derived}
    return {k: self.samples[k][replicate] for k in PARAMETRIC_NAMES + DERIVED_NAMES}

  def predict(self, N, D, replicate: Optional[int] = None):
    p = self._p(replicate)
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]

  def optimal_N(self, C, replicate: Optional[int] = None):
    p = self._p(replicate)
    return p["G"] * (np.asarray(C, np.float64) / 6.0) ** p["a"]

  def optimal_D(self, C, replicate: Optional[int] = None):
    p = self._p(replicate)
    return (np.asarray(C, np.float64) / 6.0) ** p["b"] / p["G"]

  def frontier_loss(self, C, replicate: Optional[int] = None):
    return self.predict(self.optimal_N(C, replicate), self.optimal_D(C, replicate), replicate)

  def compute_for_loss(self, loss, replicate: Optional[int] = None):
    """The compute C at which the compute-optimal loss equals `loss` (inf if loss <= E)."""
    p = self._p(replicate)
    out = []
    for target in np.atleast_1d(np.asarray(loss, np.float64)):
      if not target > p["E"]:
        out.append(math.inf)
        continue
      f = lambda lc: float(self.frontier_loss(math.exp(lc), replicate)) - target
      lo, hi = math.log(1e-6), math.log(1e40)
      out.append(math.exp(optimize.brentq(f, lo, hi, xtol=1e-12)) if f(lo) > 0 > f(hi)
                 else math.nan)
    return np.asarray(out) if np.ndim(loss) else out[0]

  @property
  def num_replicates(self) -> int:
    return len(self.samples.get("E", []))

  def to_dict(self, samples: bool = True) -> dict:
    d = {"approach": 3, "params": self.params, "derived": self.derived, "ci": self.ci,
         "objective": self.objective, "num_points": self.num_points,
         "num_starts": self.num_starts, "num_at_best": self.num_at_best,
         "fit_seconds": self.fit_seconds, "delta": self.delta, "ci_level": self.ci_level,
         "bootstrap": self.bootstrap, "bootstrap_seconds": self.bootstrap_seconds}
    if samples:
      d["samples"] = {k: [float(x) for x in v] for k, v in self.samples.items()}
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ParametricFit":
    keys = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in keys}
    kw["samples"] = {k: np.asarray(v) for k, v in d.get("samples", {}).items()}
    return cls(**kw)


def fit_parametric(N, D, loss, *, delta: float = 1e-3, grid: Optional[np.ndarray] = None,
                   bootstrap: int = 0, bootstrap_starts: int = 16, seed: int = 0,
                   ci: float = 0.95, return_ci: Optional[bool] = None) -> ParametricFit:
  """Approach 3 fit of L(N, D) = E + A / N^alpha + B / D^beta.

  Minimises sum Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L) with L-BFGS-B from
  every start of `grid` (default `chinchilla_grid()`, 4500 starts) and keeps the best; A = e^a,
  B = e^b, E = e^e. With bootstrap > 0 the runs are resampled with replacement and each
  replicate is refitted from the full fit's solution plus the `bootstrap_starts` grid points
  with the lowest objective on that replicate. `return_ci=True` is shorthand for bootstrap=200.
  """
  if return_ci and not bootstrap:
    bootstrap = 200
  _check_bootstrap(bootstrap, ci)
  if not delta > 0:
    raise ValueError(f"delta={delta} must be > 0 (Hoffmann et al. use 1e-3)")
  N, D, loss = _positive("N", N), _positive("D", D), _positive("loss", loss)
  n = _same_length(N=N, D=D, loss=loss)
  if n < 5:
    raise ValueError(f"{n} runs cannot determine the 5 parameters of L(N, D); collect more runs.")
  logN, logD, logL = np.log(N), np.log(D), np.log(loss)
  grid = chinchilla_grid() if grid is None else np.atleast_2d(np.asarray(grid, np.float64))
  if grid.shape[-1] != 5:
    raise ValueError("grid rows must be (a, b, e, alpha, beta)")

  t0 = time.perf_counter()
  best, results = _minimize_from(grid, logN, logD, logL, delta)
  fit_seconds = time.perf_counter() - t0
  values = np.array([v for v, _ in results])
  num_at_best = int(np.sum(values <= best.fun * (1 + 1e-9) + 1e-15))
  params = _theta_to_params(best.x)

  samples: dict[str, list] = {k: [] for k in PARAMETRIC_NAMES + DERIVED_NAMES}
  rng = np.random.default_rng(seed)
  t1 = time.perf_counter()
  for _ in range(bootstrap):
    pick = rng.integers(0, n, n)
    lN, lD, lL = logN[pick], logD[pick], logL[pick]
    if np.ptp(lN) == 0 or np.ptp(lD) == 0:
      continue
    init = _batched_objective(grid, lN, lD, lL, delta)
    starts = np.vstack([best.x[None], grid[np.argsort(init)[:bootstrap_starts]]])
    res, _ = _minimize_from(starts, lN, lD, lL, delta)
    p = _theta_to_params(res.x)
    for k, v in {**p, **_derived(p)}.items():
      samples[k].append(v)
  return ParametricFit(params=params, derived=_derived(params), objective=float(best.fun),
                       num_points=n, num_starts=len(grid), num_at_best=num_at_best,
                       fit_seconds=fit_seconds, delta=delta,
                       samples={k: np.asarray(v) for k, v in samples.items()}, ci_level=ci,
                       bootstrap=bootstrap, bootstrap_seconds=time.perf_counter() - t1)


# ---------------------------------------------------------------------------------------------
# Compute multiplier between two families.


@dataclasses.dataclass
class Multiplier:
  """m(C) = C_A(L_B(C)) / C: the compute family A needs for the loss family B reaches with C."""

  compute: list[float]
  multiplier: list[float]
  ci: list[tuple[float, float]]
  ci_level: float
  num_replicates: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def compute_multiplier(fit_a, fit_b, *, compute=None, ci: Optional[float] = None) -> Multiplier:
  """How much more compute family A (e.g. MDLM) needs than family B (e.g. AR) for the same loss.

  fit_a, fit_b: IsoFLOPFit, EnvelopeFit or ParametricFit (anything with frontier_loss(C, r),
  compute_for_loss(L, r) and num_replicates). For each C in `compute` (default: the geometric
  mean of B's budgets when known, else 1e20): L = L_B(C), then m = C_A(L) / C. The interval pairs
  bootstrap replicate i of A with replicate i of B (independent resamples of the two sweeps).
  """
  if compute is None:
    compute = [_default_compute(fit_b)]
  compute = _positive("compute", np.atleast_1d(compute))
  level = ci if ci is not None else getattr(fit_a, "ci_level", 0.95)

  def mult(r_a, r_b):
    loss = np.asarray(fit_b.frontier_loss(compute, r_b), np.float64)
    return np.asarray(fit_a.compute_for_loss(loss, r_a), np.float64) / compute

  point = mult(None, None)
  reps = min(fit_a.num_replicates, fit_b.num_replicates)
  draws = np.array([mult(i, i) for i in range(reps)]) if reps else np.zeros((0, len(compute)))
  intervals = [_ci(np.log(draws[:, j]), level) if reps else (math.nan, math.nan)
               for j in range(len(compute))]
  intervals = [(math.exp(lo), math.exp(hi)) if np.isfinite(lo) else (math.nan, math.nan)
               for lo, hi in intervals]
  return Multiplier([float(c) for c in compute], [float(m) for m in point], intervals, level, reps)


def _default_compute(fit) -> float:
  if isinstance(fit, IsoFLOPFit):
    Cs = [r["C"] for r in fit.budgets]
  elif isinstance(fit, EnvelopeFit):
    Cs = [p["C"] for p in fit.points]
  else:
    return 1e20
  return float(np.exp(np.mean(np.log(Cs))))


def summarize(fit: Any) -> dict:
  """Flat {quantity: (estimate, lo, hi)} for any fit."""
  if isinstance(fit, ParametricFit):
    ci = fit.ci
    return {k: (v, *ci.get(k, (math.nan, math.nan))) for k, v in {**fit.params,
                                                                   **fit.derived}.items()}
  out = {}
  for name, law in fit.laws.items():
    out[f"{name}_exponent"] = (law.exponent, *law.ci["exponent"])
    out[f"{name}_coefficient"] = (law.coefficient, *law.ci["coefficient"])
  return out


def fit_from_dict(d: dict):
  return {1: EnvelopeFit, 2: IsoFLOPFit, 3: ParametricFit}[d["approach"]].from_dict(d)


__all__ = [
    "PowerLaw", "fit_power_law", "fit_parabola", "parabola_vertex", "IsoFLOPFit", "fit_isoflop",
    "lower_envelope", "EnvelopeFit", "fit_envelope", "chinchilla_grid", "ParametricFit",
    "fit_parametric", "Multiplier", "compute_multiplier", "summarize", "fit_from_dict",
]
