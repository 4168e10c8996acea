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
  # Bits per character: the total nats over the characters of exactly the scored text, here
  # every real token of the first 3 batches of 8 rows, counted independently by decoding.
  assert res["chars"] == _decoded_chars(tiny_run, rows=24, skip_first=False)
  assert res["bpc"] == pytest.approx(res["nats"] / math.log(2) / res["chars"])
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


def _decoded_chars(run_dir, rows, skip_first):
  """Characters of the decoded text of the first `rows` validation rows (their real tokens; the
  first token of each row left out for a next-token measure, which does not score it)."""
  from mdlm import data as data_lib, rundir
  loaded = rundir.load_run(run_dir)
  ds = data_lib.build_dataset(loaded.config.data, loaded.tokenizer, split="val", batch_size=8,
                              seed=0, cache_dir=rundir.RunDir(run_dir).data_cache_dir,
                              shuffle=False, num_epochs=1)
  total = 0
  for batch in ds:
    for tokens, mask in zip(batch["tokens"], batch["token_mask"]):
      if rows == 0:
        return total
      rows -= 1
      kept = tokens[mask][1:] if skip_first else tokens[mask]
      total += len(loaded.tokenizer.decode(kept))
  return total


def test_evaluate_ar_is_exact_and_deterministic(tiny_ar_run):
  a = evaluate.evaluate_run(evaluate.EvalConfig(run=tiny_ar_run, batch_size=8, max_batches=2))
  assert a["chars"] == _decoded_chars(tiny_ar_run, rows=16, skip_first=True)
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
