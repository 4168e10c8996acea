"""Which masking wins, on which measure? Every masked-LM preset, MDLM and the AR baseline, trained
with the same model and token budget, then scored on the same held-out text.

  python experiments/masking/run.py                      # train what is missing, evaluate, report
  python experiments/masking/run.py --only mlm15,mdlm    # a subset
  python experiments/masking/run.py --report-only        # rebuild the table from results.json

Each run is `python -m mdlm.train experiment=<preset>` at the table's size (4 layers, d=256, L=128,
batch 32, 500 steps = 2.05M tokens) on ../shared/data/pd-prose.txt.gz with one sentencepiece
tokenizer (4,096 pieces) shared by all runs (data.cache_dir). Runs live under --runs; a finished
run is skipped and an interrupted one resumes (train.resume=auto), so the script can be stopped
and started again. Every bidirectional model is scored with the NELBO, the pseudo-log-likelihood
and the masked-token NLL at 15/40/80%; every model trained causally with the exact AR NLL.
Writes results.json, results.md and masking.png under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from experiments.runs import train_unless_finished  # noqa: E402
from mdlm.rundir import RunDir  # noqa: E402

# name -> (experiment preset, paper)
RUNS = {
    "mdlm": ("default", "MDLM NELBO (Sahoo et al. 2024)"),
    "mdlm_is": ("mdlm_is", "MDLM NELBO, importance-sampled t"),
    "mlm15": ("mlm15", "15% [MASK]-only (Wettig et al. 2023)"),
    "mlm40": ("mlm40", "40% [MASK]-only (Wettig et al. 2023)"),
    "mlm80": ("mlm80", "80% [MASK]-only (Wettig et al. 2023)"),
    "mlm15_bert": ("mlm15_bert", "15% 80-10-10 (BERT)"),
    "mlm40_span": ("mlm40_span", "40% spans (Wettig et al. 2023)"),
    "upmlm": ("upmlm", "uniform ratio (u-PMLM, Liao et al. 2020)"),
    "mrd_linear": ("mrd_linear", "ratio decay, linear (Yang et al. 2023)"),
    "mrd_cosine": ("mrd_cosine", "ratio decay, cosine (Yang et al. 2023)"),
    "ptw": ("ptw", "content-weighted (Yang et al. 2023)"),
    "antlm": ("antlm", "AR / MLM / AR phases (AntLM, Yu et al. 2024)"),
    "ar": ("ar_default", "autoregressive baseline"),
}
# The size every row of the committed table was trained at (the default run's model when the
# table was made; pinned here so that a change of the default cannot mix sizes in one table).
TABLE_MODEL = ["model.num_layers=4", "model.dtype=float32"]
COLUMNS = ["nelbo", "pll", "masked15", "masked40", "masked80", "ar"]


def evaluate(name: str, run_dir: str, args) -> dict:
  from mdlm import evaluate as eval_lib
  from mdlm.rundir import load_config
  applicable = eval_lib.applicable_measures(load_config(run_dir))
  out = {}
  for measure in [m for m in COLUMNS if m in applicable]:
    batches = args.pll_batches if measure == "pll" else args.eval_batches
    res = eval_lib.evaluate_run(eval_lib.EvalConfig(
        run=run_dir, measures=[measure], time_samples=args.time_samples, max_batches=batches,
        batch_size=32, output=os.path.join(run_dir, f"eval_masking_{measure}.json"),
        progress=False))
    r = res["measures"][measure]
    out[measure] = {"nll": r["nll"], "stderr": r["nll_stderr"], "sequences": r["sequences"],
                    "count": r["tokens"]}
    print(f"  {name} {measure}: {r['nll']:.4f} ± {r['nll_stderr']:.4f}", flush=True)
  return out


def tokenizer_fingerprint(run_dir: str) -> str:
  """sha256 of the run's tokenizer files: rows compare only if they share it (the sentencepiece
  training is deterministic, so a run trained on another machine shares it too)."""
  digest = hashlib.sha256()
  tok_dir = os.path.join(run_dir, "tokenizer")
  for name in sorted(os.listdir(tok_dir)):
    with open(os.path.join(tok_dir, name), "rb") as f:
      digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()


def report(results: dict, out_dir: str) -> None:
  lines = ["| run | what | " + " | ".join(COLUMNS) + " | train wall time |",
           "|---|---|" + "---|" * (len(COLUMNS) + 1)]
  best = {c: min((r["measures"][c]["nll"] for r in results.values() if c in r["measures"]),
                 default=None) for c in COLUMNS}
  for name, r in results.items():
    cells = []
    for c in COLUMNS:
      m = r["measures"].get(c)
      if m is None:
        cells.append("")
        continue
      text = f"{m['nll']:.3f} ± {m['stderr']:.3f}"
      cells.append(f"**{text}**" if m["nll"] == best[c] else text)
    minutes = r.get("wall_time", float("nan")) / 60
    lines.append(f"| {name} | {RUNS[name][1]} | " + " | ".join(cells) + f" | {minutes:.1f} min |")
  lines += ["", "nats per token (nelbo, pll, ar) or per masked token (masked*), mean ± standard "
            "error over sequences; all rows score the same held-out sequences, so differences "
            "between rows are more precise than the errors suggest. PLL is a pseudo-likelihood, "
            "not a likelihood. Wall times were taken on a shared 2-core CPU whose load varied "
            "between runs: they do not compare objectives (experiments/bench_objectives.py does)."]
  fingerprints = {r["tokenizer_sha256"] for r in results.values() if "tokenizer_sha256" in r}
  if fingerprints:
    marked = sum("tokenizer_sha256" in r for r in results.values())
    lines.append("")
    lines.append(f"Tokenizer sha256 {', '.join(sorted(f[:16] for f in fingerprints))} for the "
                 f"{marked} rows that record it; the sentencepiece training is deterministic "
                 "(retraining it reproduces the file byte for byte), so rows trained before the "
                 "fingerprint was recorded, by the same code on the same corpus, share it."
                 + (" ROWS DISAGREE: they do not compare." if len(fingerprints) > 1 else ""))
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  _plot(results, out_dir)


def _plot(results: dict, out_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 4.5), sharey=False)
  names = list(results)
  for ax, c in zip(axes, COLUMNS):
    ys = [results[n]["measures"].get(c, {}).get("nll", math.nan) for n in names]
    es = [results[n]["measures"].get(c, {}).get("stderr", 0.0) for n in names]
    ax.barh(range(len(names)), ys, xerr=es, color="tab:blue")
    ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
    finite = [y for y in ys if math.isfinite(y)]
    if finite:
      ax.set_xlim(min(finite) * 0.95, max(finite) * 1.02)
    ax.set_title(c)
    ax.set_xlabel("nats per token" if c in ("nelbo", "pll", "ar") else "nats per masked token")
  fig.suptitle("Masking variants at equal budget (pd-prose, 4 x 256, 2.05M tokens); lower is better")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "masking.png"), dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=os.path.join(os.path.dirname(REPO), "shared", "data",
                                                "pd-prose.txt.gz"))
  p.add_argument("--runs", default=os.path.join(REPO, "runs", "masking"))
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "masking"))
  p.add_argument("--only", help="comma-separated subset of: " + ", ".join(RUNS))
  p.add_argument("--eval-batches", type=int, default=16, help="batches of 32 sequences")
  p.add_argument("--pll-batches", type=int, default=2, help="PLL costs L forward passes a row")
  p.add_argument("--time-samples", type=int, default=4)
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--redo", action="store_true", help="train and score runs already in results.json")
  p.add_argument("extra", nargs="*", help="extra Hydra overrides for every training run")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, "results.json")
  results = json.load(open(results_path)) if os.path.exists(results_path) else {}
  if not args.report_only:
    if not os.path.exists(args.data):
      raise SystemExit(f"--data {args.data} does not exist; pass the corpus path.")
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = set(names) - set(RUNS)
    if unknown:
      raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    for name in names:
      if name in results and not args.redo:
        print(f"{name}: already in {results_path}, skipped (--redo to run it again)", flush=True)
        continue
      run_dir = train_unless_finished(
          name, os.path.join(args.runs, name),
          [f"experiment={RUNS[name][0]}", *TABLE_MODEL, "data=text", f"data.path={args.data}",
           f"data.cache_dir={os.path.join(args.runs, 'data_cache')}"] + args.extra)
      status = RunDir(run_dir).read_status()
      results[name] = {"run_dir": os.path.relpath(run_dir, REPO), "preset": RUNS[name][0],
                       "wall_time": status.get("wall_time"),
                       "tokenizer_sha256": tokenizer_fingerprint(run_dir),
                       "measures": evaluate(name, run_dir, args)}
      with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
  report({n: results[n] for n in RUNS if n in results}, args.out)


if __name__ == "__main__":
  main()
