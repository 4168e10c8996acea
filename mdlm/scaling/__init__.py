"""Scaling-law sweeps for masked diffusion and AR models: families, IsoFLOP planning, launching,
collecting, fitting (Hoffmann et al. 2022 Approaches 1-3) and plotting.

CLI: `python -m mdlm.scaling plan|launch|collect|fit|plot|all ...` (see `--help`).
"""

from mdlm.scaling.family import Family, Size, aspect_family, explicit_family, smdm_family, \
    smdm_non_embedding, SMDM_SIZES
from mdlm.scaling.fit import EnvelopeFit, IsoFLOPFit, Multiplier, ParametricFit, PowerLaw, \
    chinchilla_grid, compute_multiplier, fit_envelope, fit_isoflop, fit_parametric, \
    fit_power_law, lower_envelope, parabola_vertex, summarize
from mdlm.scaling.plan import Job, SweepRecipe, load_jobs, plan_sweep, write_plan
from mdlm.scaling.collect import collect_runs, fit_rows, read_csv, read_curves, \
    read_curves_csv, write_csv, write_curves_csv

__all__ = [
    "Family", "Size", "aspect_family", "explicit_family", "smdm_family", "smdm_non_embedding",
    "SMDM_SIZES", "EnvelopeFit", "IsoFLOPFit", "Multiplier", "ParametricFit", "PowerLaw",
    "chinchilla_grid", "compute_multiplier", "fit_envelope", "fit_isoflop", "fit_parametric",
    "fit_power_law", "lower_envelope", "parabola_vertex", "summarize", "Job", "SweepRecipe",
    "load_jobs", "plan_sweep", "write_plan", "collect_runs", "fit_rows", "read_csv", "read_curves",
    "read_curves_csv", "write_csv", "write_curves_csv",
]
