"""Likelihood evaluation of a checkpoint: the CLI, standard errors, zero-shot data, bad input."""

import json
import math
import os

import numpy as np
import pytest

from mdlm import evaluate
from tests.helpers import run_python


def test_ratio_with_stderr_matches_direct_formula():
  rng = np.random.default_rng(0)
  counts = rng.integers(5, 50, 200).astype(float)
  sums = counts * 3.0 + rng.normal(0, 2, 200)
  r, se = evaluate.ratio_with_stderr(sums, counts)
  assert r == pytest.approx(sums.sum() / counts.sum())
  # Bootstrap over sequences agrees with the delta-method standard error.
  boot = []
  for _ in range(2000):
    idx = rng.integers(0, 200, 200)
    boot.append(sums[idx].sum() / counts[idx].sum())
  assert se == pytest.approx(np.std(boot), rel=0.15)
  with pytest.raises(ValueError, match="No tokens"):
    evaluate.ratio_with_stderr([1.0], [0.0])


def test_evaluate_run_diffusion_and_zero_shot(tiny_run, tmp_path):
  res = evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_run, time_samples=2, batch_size=8,
                                                  max_batches=3))
  assert res["objective"] == "diffusion" and res["sequences"] > 0
  assert res["nll_stderr"] > 0 and math.isfinite(res["nll"])
  assert res["ppl"] == pytest.approx(math.exp(res["nll"]))
  assert res["bpt"] == pytest.approx(res["nll"] / math.log(2))
  # Byte tokens: one per character plus BOS/EOS, so bits per char sit just above bits per token.
  assert res["bpc"] == pytest.approx(res["bpt"] / res["chars_per_token"])
  assert 0.9 < res["chars_per_token"] < 1.0
  assert json.load(open(res["output"]))["nll"] == res["nll"]
  # More Monte Carlo samples per sequence lower the standard error of the same estimate.
  res8 = evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_run, time_samples=8, batch_size=8,
                                                   max_batches=3, output=str(tmp_path / "e.json")))
  assert res8["nll_stderr"] < res["nll_stderr"]
  assert abs(res8["nll"] - res["nll"]) < 4 * res["nll_stderr"]
  # Zero-shot: another corpus, the model's own tokenizer.
  corpus = tmp_path / "other.txt"
  corpus.write_text("\n".join(f"Line {i} of some other text, quite unlike Shakespeare." for i in
                              range(400)))
  zs = evaluate.evaluate_run(evaluate.EvalConfig(
      run=tiny_run, batch_size=8, max_batches=2, data={"source": "text", "path": str(corpus)}))
  assert zs["data_source"] == "text" and math.isfinite(zs["nll"])


def test_evaluate_ar_is_exact_and_deterministic(tiny_ar_run):
  a = evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_ar_run, batch_size=8, max_batches=2))
  b = evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_ar_run, batch_size=8, max_batches=2,
                                                seed=5))
  assert a["objective"] == "ar" and a["nll"] == b["nll"]  # exact: no Monte Carlo


def test_evaluate_cli(tiny_run, tmp_path):
  out = tmp_path / "cli.json"
  proc = run_python(["-m", "mdlm.evaluate", f"run={tiny_run}", "max_batches=1", "batch_size=8",
                     f"output={out}"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "bits/token" in proc.stdout and "bits/char" in proc.stdout and out.exists()
  bad = run_python(["-m", "mdlm.evaluate", f"run={tmp_path}/missing"], timeout=120)
  assert bad.returncode == 1 and "No run directory" in bad.stderr
  unknown = run_python(["-m", "mdlm.evaluate", f"run={tiny_run}", "bogus=1"], timeout=120)
  assert unknown.returncode == 1 and "bogus" in unknown.stderr
