"""Two-token joints derived from the default-size masked models (Torroba Hennigen and Kim 2023,
"Deriving Language Models from Masked Language Models"; mdlm.joints), with an AR model's exact
joint as the reference where it conditions on the same tokens.

  python experiments/joints/run.py --runs /work/runs/joints [--pairs 100] [--top-k 50]

--runs holds four runs of the embedded default (configs/model/cpu_default.yaml, 500 steps):
  char_mlm  python -m mdlm.train tokenizer=char run_dir=<runs>/char_mlm
  char_ar   python -m mdlm.train tokenizer=char model=ar run_dir=<runs>/char_ar
  sp_mlm    python -m mdlm.train run_dir=<runs>/sp_mlm
  sp_ar     python -m mdlm.train model=ar run_dir=<runs>/sp_ar
Char models are scored exactly (all V tokens per position) and, to measure what the restriction
does, on a top-20 support too; sentencepiece (V = 4096) on the paper's top-K support (K = 50),
and exactly on a few adjacent pairs (8,193 forward passes each). Top-K supports always hold the
true tokens (forced in when the model would not have picked them, which the tables count), so a
uniform joint over the support scores P-PPL = K: the bar a weak model's joints can miss.

Pairs: one per held-out window of 128 tokens, four kinds (mdlm.joints): adjacent and distant
anywhere in the window (both sides of context), and adjacent_end /
distant_end, where x_j is the window's last token, so the denoiser sees exactly the AR model's
left context and the AR joint p(x_i, x_j | the rest) is exact. Besides mdlm.joints' figures the
tables give each construction's pair NLL minus AG's, paired over the same pairs (mean ± s.e.),
and AG run for the fixed 40 iterations of the paper's code instead of to convergence.

Cost: seconds per 1,000 pairs of each construction alone (mdlm.joints.construction_joint: only the
forward passes it needs), interleaved over rounds, median of repeats, with the load average.
Writes experiments/results/joints/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import mdlm  # noqa: E402,F401 (first: its host-malloc settings must precede jax's threads)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.runs import loadavg  # noqa: E402
from mdlm import joints  # noqa: E402
from mdlm.rundir import load_run  # noqa: E402

KINDS = ("adjacent", "distant", "adjacent_end", "distant_end")
PAPER_AG_ITERATIONS = 40  # the default of the paper's code (--iter-steps)


@jax.jit
def _fixed_ag(tables):
  """AG with the paper code's fixed 40 iterations, scored like the others."""
  log_i, log_j = tables.log_cond_i(), tables.log_cond_j()
  ag = joints.ag_joint(log_i, log_j, PAPER_AG_ITERATIONS, tol=0.0)
  return joints.pair_metrics(ag, log_i, log_j, tables.true_i, tables.true_j)


def score(model, ar, windows, kind, top_k, pairs, batch, special):
  """Per-pair figures of one kind (mdlm.joints.pair_figures) plus AG at 40 iterations."""
  rows, i_N, j_N = joints.sample_pairs(windows, kind, pairs, 0, special)
  use_ar = ar if kind.endswith("_end") else None
  parts, start = [], time.perf_counter()
  for s in range(0, len(rows), batch):
    sl = slice(s, s + batch)
    tokens = windows[rows[sl]]
    tables = joints.pair_tables(model, tokens, i_N[sl], j_N[sl], top_k=top_k)
    ref = None
    if use_ar is not None:
      ref = joints.ar_pair_joint(use_ar, tokens, i_N[sl], j_N[sl], tables.support_i,
                                 tables.support_j)
    figures = dict(joints.pair_figures(tables, ref))
    figures["ag_40"] = _fixed_ag(tables)
    parts.append(jax.tree.map(np.asarray, figures))
    print(f"  {kind}: {min(s + batch, len(rows))}/{len(rows)} pairs, "
          f"{time.perf_counter() - start:.0f} s, load {loadavg()}", flush=True)
  per_pair = jax.tree.map(lambda *x: np.concatenate(x), *parts)
  summary = joints.summarize(per_pair)
  for name in per_pair:  # pair NLL minus AG's, paired over the same pairs
    if "nll_pair" in per_pair[name] and name != "ag":
      diff = per_pair[name]["nll_pair"] - per_pair["ag"]["nll_pair"]
      summary[name]["minus_ag"] = float(diff.mean())
      summary[name]["minus_ag_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
  return {"pairs": int(len(rows)), "mean_distance": float(np.mean(j_N - i_N)),
          "seconds": time.perf_counter() - start, "figures": summary}


def passes_per_pair(name: str, vocab: int, top_k) -> int:
  """Forward passes of one pair (rows of the window): the candidate passes (1 doubly masked; 3
  under top-K), then the substitutions each construction needs."""
  k = top_k or vocab
  base = 1 if top_k is None else 3
  return base + {"unary": 0, "hcb": k + 1}.get(name, 2 * k)


@jax.jit
def _ag_alone(log_i, log_j):
  return joints.ag_solve(log_i, log_j)


def _median_times(fns: dict, repeats: int):
  """{name: (median wall s, median process CPU s)}, the calls interleaved in rotated order."""
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn())
  names, wall, cpu = list(fns), {n: [] for n in fns}, {n: [] for n in fns}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name]())
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {n: (float(np.median(wall[n])), float(np.median(cpu[n]))) for n in names}


def timing(model, windows, top_k, batch, repeats):
  """Seconds per 1,000 pairs of each construction alone (wall and process CPU time), and of AG's
  iterations alone on the same tables; interleaved rounds, medians, with the load average."""
  rows, i_N, j_N = joints.sample_pairs(windows, "distant", batch, 1)
  tokens = windows[rows]
  fns = {n: (lambda n=n: joints.construction_joint(model, tokens, i_N, j_N, n,
                                                   top_k=top_k).log_joint)
         for n in joints.CONSTRUCTIONS}
  tables = joints.pair_tables(model, tokens, i_N, j_N, top_k=top_k)
  fns["ag_iterations_alone"] = lambda: _ag_alone(tables.log_cond_i(), tables.log_cond_j())
  before = loadavg()
  medians = _median_times(fns, repeats)
  scale = 1000.0 / len(rows)
  vocab = model.cfg.vocab_size
  return {"seconds_per_1000_pairs": {n: scale * w for n, (w, _) in medians.items()},
          "cpu_seconds_per_1000_pairs": {n: scale * c for n, (_, c) in medians.items()},
          "passes_per_pair": {n: passes_per_pair(n, vocab, top_k) for n in joints.CONSTRUCTIONS},
          "ag_iterations": np.asarray(_ag_alone(tables.log_cond_i(),
                                                tables.log_cond_j())[1]).tolist(),
          "batch": int(len(rows)), "repeats": repeats, "loadavg_before": before,
          "loadavg_after": loadavg()}


def study(runs_dir, name, top_k, args, kinds=KINDS, time_it=True, pairs=None, batch=None):
  mlm = load_run(os.path.join(runs_dir, f"{name}_mlm"))
  ar = load_run(os.path.join(runs_dir, f"{name}_ar")).model
  cfg, tok = mlm.config, mlm.tokenizer
  pairs, batch = pairs or args.pairs, batch or args.batch
  windows = joints.held_out_windows(cfg.data, tok, "val", 4 * args.pairs, 0,
                                    os.path.join(runs_dir, f"{name}_mlm", "data_cache"))
  special = [tok.bos_id, tok.eos_id, tok.pad_id]
  out = {"run": mlm.run_dir, "step": mlm.step, "vocab_size": tok.vocab_size,
         "support": top_k or tok.vocab_size, "exact": top_k is None, "kinds": {}}
  print(f"{name}: V={tok.vocab_size}, support {out['support']}", flush=True)
  if time_it:
    out["timing"] = timing(mlm.model, windows, top_k, args.timing_batch, args.repeats)
  for kind in kinds:
    out["kinds"][kind] = score(mlm.model, ar, windows, kind, top_k, pairs, batch, special)
  return out


LABELS = {"unary": "unary (both masked)", "mrf": "MRF", "mrf_logit": "MRF, logits",
          "hcb": "HCB", "ag": "AG", "ag_40": "AG, 40 iterations", "conditionals":
          "model's conditionals", "ar": "AR, exact (reference)"}


def _f(row, key):
  if key not in row:
    return "-"
  return f"{joints.number(row[key])} ± {joints.number(row[key + '_se'])}"


def kind_table(res, with_ar) -> list[str]:
  head = "| joint | P-PPL | pair NLL − AG's | U-PPL | KL (all) | KL (true) |"
  head += " KL(AR ‖ joint) |" if with_ar else ""
  lines = [head, "|" + "---|" * (7 if with_ar else 6)]
  for name in LABELS:
    if name not in res["figures"]:
      continue
    row = res["figures"][name]
    p_ppl = f"{row['p_ppl']:.2f}" if "p_ppl" in row else "-"
    cells = [LABELS[name], p_ppl, _f(row, "minus_ag"), f"{row['u_ppl']:.2f}", _f(row, "kl_all"),
             _f(row, "kl_true")]
    if with_ar:
      cells.append(_f(row, "kl_to_ar"))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def cost_table(t) -> list[str]:
  lines = [f"Cost of each construction alone (mdlm.joints.construction_joint, batches of "
           f"{t['batch']} pairs, median of {t['repeats']} interleaved rounds; wall and process "
           f"CPU seconds; load {t['loadavg_before']} -> {t['loadavg_after']}). AG's iterations "
           f"alone took {np.mean(t['ag_iterations']):.0f} steps on these pairs.", "",
           "| construction | forward passes / pair | s / 1,000 pairs (wall) | CPU s / 1,000 pairs |"
           " CPU × MRF |", "|---|---|---|---|---|"]
  cpu = t["cpu_seconds_per_1000_pairs"]
  for n, wall in t["seconds_per_1000_pairs"].items():
    label = "AG's iterations alone" if n == "ag_iterations_alone" else LABELS[n]
    lines.append(f"| {label} | {t['passes_per_pair'].get(n, 0)} | {wall:.0f} | {cpu[n]:.0f} | "
                 f"{cpu[n] / cpu['mrf']:.2f} |")
  return lines


def markdown(record) -> str:
  lines = ["# Derived two-token joints of the default-size models", "",
           f"`{record['command']}`; {record['pairs']} held-out pairs per kind; "
           f"load average {record['loadavg_start']} at the start, {record['loadavg_end']} at the "
           "end. P-PPL = exp(mean pair NLL / 2); pair NLL − AG's: paired over the same pairs, "
           "nats per pair (mean ± s.e.); U-PPL from each joint's own conditionals; KL in nats, "
           "the model's conditionals against the joint's (all: every conditioning value of the "
           "support; true: at the true tokens). AG runs to convergence (no marginal moves "
           f"by {joints.AG_TOL:g}); 'AG, 40 iterations' is the paper code's fixed count.", ""]
  if "timing_command" in record:
    lines += [f"Costs measured again by `{record['timing_command']}`.", ""]
  for name, study_ in record["studies"].items():
    support = ("exact, all" if study_["exact"] else f"top-{study_['support']} of")
    lines += [f"## {name}: {support} {study_['vocab_size']} tokens per position "
              f"({study_['run']}, step {study_['step']})", ""]
    for kind, res in study_["kinds"].items():
      ag, model_row = res["figures"]["ag"], res["figures"]["conditionals"]
      slate = ""
      if not study_["exact"] and "truth_forced" in model_row:
        slate = (f"; the true tokens had to be forced into the support for "
                 f"{100 * model_row['truth_forced']:.0f}% of pairs (the uniform joint over the "
                 f"support scores P-PPL = {study_['support']})")
      lines += [f"### {kind}: {joints.PAIR_KINDS[kind]}; {res['pairs']} pairs, mean distance "
                f"{res['mean_distance']:.1f}; AG converged in {ag['iterations']:.0f} iterations "
                f"on average (max {ag['iterations_max']:.0f}){slate}", ""]
      lines += kind_table(res, kind.endswith("_end")) + [""]
    if "timing" in study_:
      lines += cost_table(study_["timing"]) + [""]
  return "\n".join(lines)


def retime(args, suffix: str) -> int:
  """Replaces the cost measurement of the studies in an existing results file."""
  path = os.path.join(args.out, f"results{suffix}.json")
  with open(path) as f:
    record = json.load(f)
  for name, study_ in record["studies"].items():
    if "timing" not in study_:
      continue
    mlm = load_run(os.path.join(args.runs, f"{name}_mlm"))
    windows = joints.held_out_windows(mlm.config.data, mlm.tokenizer, "val", 4 * args.pairs, 0,
                                      os.path.join(args.runs, f"{name}_mlm", "data_cache"))
    top_k = None if study_["exact"] else study_["support"]
    study_["timing"] = timing(mlm.model, windows, top_k, args.timing_batch, args.repeats)
  record["timing_command"] = "python experiments/joints/run.py " + " ".join(sys.argv[1:])
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(markdown(record))
  print(markdown(record))
  return 0


def combine(out: str) -> int:
  """One record (and table) from the results_<part>.json of separate --only runs."""
  parts = [p for p in ("char", "char_topk", "sp", "sp_exact")
           if os.path.exists(os.path.join(out, f"results_{p}.json"))]
  records = [json.load(open(os.path.join(out, f"results_{p}.json"))) for p in parts]
  record = {"command": "; ".join(r["command"] for r in records), "pairs": records[0]["pairs"],
            "loadavg_start": records[0]["loadavg_start"], "loadavg_end": records[-1]["loadavg_end"],
            "studies": {k: v for r in records for k, v in r["studies"].items()}}
  timing = [r["timing_command"] for r in records if "timing_command" in r]
  if timing:
    record["timing_command"] = "; ".join(timing)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(record, f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(record))
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="/work/runs/joints")
  parser.add_argument("--pairs", type=int, default=100, help="pairs per kind")
  parser.add_argument("--top-k", type=int, default=50, help="sentencepiece support size")
  parser.add_argument("--batch", type=int, default=4, help="pairs per forward batch")
  parser.add_argument("--timing-batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--char-top-k", type=int, default=20,
                      help="also score the char model's adjacent and distant pairs on a top-K "
                           "support, to measure what the restriction does (0: no)")
  parser.add_argument("--sp-exact-pairs", type=int, default=8,
                      help="also score this many adjacent pairs of the sentencepiece model "
                           "exactly, over all V tokens (0: no)")
  parser.add_argument("--only", choices=("char", "sp", "char_topk", "sp_exact"), default=None)
  parser.add_argument("--combine", action="store_true",
                      help="merge results_<part>.json files of --only runs into results.json")
  parser.add_argument("--timing-only", action="store_true",
                      help="redo only the cost measurement, into the existing results file")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "joints"))
  args = parser.parse_args(argv)
  suffix = f"_{args.only}" if args.only else ""
  if args.combine:
    return combine(args.out)
  if args.timing_only:
    return retime(args, suffix)
  record = {"command": "python experiments/joints/run.py " + " ".join(sys.argv[1:]),
            "pairs": args.pairs, "loadavg_start": loadavg(), "studies": {}}
  for name, top_k in (("char", None), ("sp", args.top_k)):
    if args.only in (None, name):
      record["studies"][name] = study(args.runs, name, top_k, args)
  if args.char_top_k and args.only in (None, "char_topk"):
    record["studies"][f"char_top{args.char_top_k}"] = study(
        args.runs, "char", args.char_top_k, args, kinds=("adjacent", "distant"), time_it=False)
  if args.sp_exact_pairs and args.only in (None, "sp_exact"):
    record["studies"]["sp_exact"] = study(args.runs, "sp", None, args, kinds=("adjacent",),
                                          time_it=False, pairs=args.sp_exact_pairs, batch=1)
  record["loadavg_end"] = loadavg()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"results{suffix}.json"), "w") as f:
    json.dump(record, f, indent=1)
  with open(os.path.join(args.out, f"results{suffix}.md"), "w") as f:
    f.write(markdown(record))
  print(markdown(record))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
