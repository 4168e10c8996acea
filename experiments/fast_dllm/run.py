"""Fast-dLLM's approximate KV caches against the exact samplers, on one trained model.

Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and
Parallel Decoding": confidence-threshold parallel decoding plus a prefix or dual (prefix + suffix)
KV cache refreshed at block boundaries (mdlm.sampling.fast_dllm). This script measures their
speed-up and their cost in quality side by side with the exact samplers, on the default MDLM run
(the denoiser) scored by the default AR run (the evaluator; the same tokenizer).

Tasks, on held-out sequences of the run's length L = 128 (the first --num of the validation split):
  continuation  the first 32 tokens given, the other 96 generated (3 blocks of 32);
  infill        tokens 32..95 masked (64: 2 blocks of 32), the 32 after them given.
Samplers (rows):
  ancestral             MDLM's ancestral sampler, cached (step skipping, exact), T = 128, t = 1;
  conf tau=0.9 [cache]  the confidence sampler with Fast-dLLM's threshold 0.9 (at least one commit
                        per step; steps = the masked count), blocks of 32, greedy (temperature 0,
                        as Fast-dLLM): no KV cache, the prefix cache, the dual cache;
  conf k=2 [cache]      LLaDA's fixed schedule, two tokens per step (steps = masked / 2), blocks of
                        32: no cache, prefix, dual.
Measures:
  tokens/s     generated (masked) tokens per second of wall time, from the median time of one
               batch call (wall s) after a compile warm-up: round 0 fills all --num sequences
               in batches of --batch, rounds 1.. repeat the first --timing-batches batches;
               variants alternate call by call. `cpu s`: the same in CPU time of this process
               (less sensitive to the other users of a shared machine). speed-up (wall / cpu):
               the median over calls of the uncached sampler's time over this one's, each pair
               from the same round and batch (adjacent in time).
  NFE          denoiser calls per batch (mean), and NFE-equivalent: positions run through the
               trunk / L, so a full pass counts 1 and a cached step over a window of W positions
               W / L (the dual cache: 32 / 128; the prefix cache: from the block to the end).
  gen PPL      continuation: exp of the evaluator's mean NLL of the 96 generated tokens given the
               prompt (the data row: of the held-out text itself).
  infill NLL   infill: the evaluator's mean NLL per token of the span and of the given suffix after
               it, given the prefix (the AR model reads left to right, so the suffix's NLL is what
               scores the infill's fit to its right context; the span alone is reported too).
  agree        the fraction of generated tokens equal to those of the uncached sampler with the
               same rule: the caches' deviation, before any evaluator.
  entropy      the mean unigram entropy of the generated tokens (repetition lowers it).

  python experiments/fast_dllm/run.py [--num 64] [--batch 16] [--rounds 3]
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mdlm import data as data_lib  # noqa: E402
from mdlm.rundir import load_run  # noqa: E402
from mdlm.sampling import ancestral, cached_confidence, denoiser_from_model  # noqa: E402
from mdlm.sampling import metrics  # noqa: E402

TASKS = {"continuation": (32, 128), "infill": (32, 96)}  # masked span [a, e)


def variants(masked: int, block: int):
  """(name, rule, cache, call(key, denoise, xt, schedule, mask_id))."""
  out = [("ancestral (cached, exact)", "exact", "none",
          lambda k, d, x, s, m: ancestral(k, d, x, steps=128, schedule=s, mask_id=m, cache=True))]
  for rule, kw in (("tau=0.9", dict(steps=masked, threshold=0.9)),
                   ("k=2", dict(steps=masked // 2, threshold=None))):
    for cache in ("none", "prefix", "dual"):
      def call(k, d, x, s, m, kw=kw, cache=cache):
        return cached_confidence(k, d, x, mask_id=m, block_length=block, kv_cache=cache,
                                 temperature=0.0, **kw)
      out.append((f"confidence {rule}, {cache if cache != 'none' else 'no'} cache", rule, cache,
                  call))
  return out


def held_out(loaded, num: int):
  cfg = loaded.config
  ds = data_lib.build_dataset(cfg.data, loaded.tokenizer, split="val", batch_size=16, seed=0,
                              shuffle=False, num_epochs=1,
                              cache_dir=os.path.join(loaded.run_dir, "data_cache"))
  rows = []
  for batch in ds:
    rows.append(batch["tokens"][batch["token_mask"].all(1)])
    if sum(len(r) for r in rows) >= num:
      break
  x0 = np.concatenate(rows)[:num].astype(np.int32)
  if len(x0) < num:
    raise SystemExit(f"only {len(x0)} held-out sequences of full length; ask for --num {len(x0)}")
  return x0


def ar_token_nll(ar_model):
  """tokens [B, L] -> NLL [B, L] of each token given those before it (0 at position 0)."""
  graphdef, state = nnx.split(ar_model)

  @jax.jit
  def nll(state, tokens):
    logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))

  return lambda tokens: np.asarray(nll(state, jnp.asarray(tokens)))


def timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, time.process_time() - c0, out


def loadavg() -> str:
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def run_task(task, x0, denoise, schedule, mask_id, args, log):
  """Round 0 samples every batch with every variant (its outputs are scored); rounds 1.. repeat
  the first --timing-batches batches. Variants alternate call by call. Returns ({variant:
  {"tokens", "nfe", "nfe_equiv", "calls": [(round, batch, wall, cpu)]}}, variants)."""
  a, e = TASKS[task]
  masked = e - a
  xt_all = x0.copy()
  xt_all[:, a:e] = mask_id
  batches = [xt_all[i:i + args.batch] for i in range(0, len(xt_all), args.batch)]
  vs = variants(masked, args.block)
  res = {name: {"tokens": [], "nfe": [], "nfe_equiv": [], "calls": []} for name, *_ in vs}
  key = jax.random.key(args.seed)
  for name, _, _, call in vs:  # compile
    jax.block_until_ready(call(key, denoise, batches[0], schedule, mask_id))
  for r in range(args.rounds):
    before = loadavg()
    todo = batches if r == 0 else batches[:args.timing_batches]
    for b, xt in enumerate(todo):
      for name, _, _, call in vs:
        k = jax.random.fold_in(key, b)
        w, c, (tokens, stats) = timed(lambda: call(k, denoise, xt, schedule, mask_id))
        res[name]["calls"].append((r, b, w, c))
        if r == 0:
          res[name]["tokens"].append(np.asarray(tokens))
          res[name]["nfe"].append(int(stats["nfe"]))
          res[name]["nfe_equiv"].append(float(stats.get("nfe_equiv", stats["nfe"])))
    walls = {name: sum(c[2] for c in res[name]["calls"] if c[0] == r) for name in res}
    log["rounds"].append({"task": task, "round": r, "batches": len(todo),
                          "loadavg_before": before, "loadavg_after": loadavg(),
                          "wall_s": {k: round(v, 3) for k, v in walls.items()}})
    print(f"{task} round {r} ({len(todo)} batches): load {before} -> {loadavg()}; " + ", ".join(
        f"{k}: {v:.1f}s" for k, v in walls.items()), flush=True)
  for name in res:
    res[name]["tokens"] = np.concatenate(res[name]["tokens"])
  return res, vs


def score_task(task, x0, res, vs, nll_of, tokenizer, args):
  """One row per variant (and the held-out text): speed, cost and quality."""
  a, e = TASKS[task]
  specials = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id", -1)}
  scored = slice(a, e) if task == "continuation" else slice(a, None)  # gen PPL / infill NLL

  def quality(tokens):
    nll = nll_of(tokens)
    q = {"entropy": metrics.unigram_entropy(tokens[:, a:e], ignore=specials)["mean"],
         "per_sequence_nll": nll[:, scored].mean(1)}
    if task == "continuation":
      q["gen_ppl"] = float(np.exp(nll[:, a:e].mean()))
    else:
      q["infill_nll"] = float(nll[:, a:].mean())
      q["span_nll"] = float(nll[:, a:e].mean())
    return q

  rows = [{"sampler": "data (held-out text)", "rule": "-", "cache": "-", **quality(x0)}]
  base = {rule: name for name, rule, cache, _ in vs if cache == "none"}  # "exact": ancestral
  qualities = {name: quality(res[name]["tokens"]) for name, *_ in vs}

  def paired(name, rule, col):
    """Median over calls (same round and batch) of the uncached sampler's time over this one's."""
    ref = {(c[0], c[1]): c[col] for c in res[base[rule]]["calls"]}
    return statistics.median(ref[(c[0], c[1])] / c[col] for c in res[name]["calls"])

  for name, rule, cache, _ in vs:
    r, q = res[name], qualities[name]
    wall = statistics.median(c[2] for c in r["calls"])
    cpu = statistics.median(c[3] for c in r["calls"])
    row = {"sampler": name, "rule": rule, "cache": cache,
           "tokens_per_s": args.batch * (e - a) / wall, "wall_s": wall, "cpu_s": cpu,
           "nfe": float(np.mean(r["nfe"])), "nfe_equiv": float(np.mean(r["nfe_equiv"])),
           "calls": r["calls"], **q}
    if rule != "exact":
      # The cache's cost, paired by sequence: NLL (cached) - NLL (uncached, same rule).
      diff = q["per_sequence_nll"] - qualities[base[rule]]["per_sequence_nll"]
      row.update(speedup=paired(name, rule, 2), speedup_cpu=paired(name, rule, 3),
                 agree=float(np.mean(r["tokens"][:, a:e] == res[base[rule]]["tokens"][:, a:e])),
                 delta_nll=float(diff.mean()),
                 delta_nll_se=float(diff.std(ddof=1) / np.sqrt(len(diff))))
    rows.append(row)
  for row in rows:
    row["per_sequence_nll"] = [round(float(v), 4) for v in row["per_sequence_nll"]]
  return rows


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def markdown(table, meta, examples) -> str:
  lines = ["# Fast-dLLM KV caches vs the exact samplers", "",
           f"Denoiser `{meta['denoiser']}` (step {meta['step']}), evaluator `{meta['evaluator']}`; "
           f"{meta['num']} held-out sequences of L = {meta['length']} in batches of "
           f"{meta['batch']}; blocks of {meta['block']}; timing: medians over {meta['calls']} "
           f"batch calls per variant ({meta['rounds']} rounds), variants interleaved call by "
           f"call; backend {meta['backend']}. "
           "Command: `" + meta["command"] + "`.", "",
           "NFE: denoiser calls per batch. NFE-eq: positions run through the trunk / L (a cached "
           "step over W positions counts W / L). speed-up: median over paired calls (same batch, "
           "adjacent in time) of the uncached sampler's time, same rule, over this one's, in wall "
           "and CPU time; wall s / cpu s: median per batch call. agree: generated tokens equal to the "
           "uncached sampler's with the same rule. gen PPL: the AR evaluator's perplexity of the "
           "generated tokens given the prompt. infill NLL: its NLL per token of the span and the "
           "given suffix after it, given the prefix (span NLL: the span's tokens alone). "
           "dNLL: the cache's cost, the mean over sequences of the evaluator's NLL per token (of "
           "the scored positions) minus that of the uncached sampler with the same rule on the "
           "same sequence, +- one standard error.", ""]
  for task, rows in table.items():
    a, e = TASKS[task]
    quality = ("gen PPL", "gen_ppl", ".1f") if task == "continuation" else (
        "infill NLL", "infill_nll", ".3f")
    lines += [f"## {task}: tokens {a}..{e - 1} generated ({e - a} per sequence)", "",
              f"| sampler | tokens/s | speed-up wall | speed-up cpu | wall s | cpu s | NFE | NFE-eq "
              f"| {quality[0]} | " + ("span NLL | " if task == "infill" else "") + "agree | "
              "dNLL | entropy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + (
                  "---|" if task == "infill" else "")]
    for r in rows:
      exact = r["rule"] in ("-", "exact")
      cells = [r["sampler"], _fmt(r.get("tokens_per_s"), ".0f"),
               "-" if exact else _fmt(r.get("speedup"), ".2f") + "x",
               "-" if exact else _fmt(r.get("speedup_cpu"), ".2f") + "x",
               _fmt(r.get("wall_s"), ".1f"), _fmt(r.get("cpu_s"), ".1f"),
               _fmt(r.get("nfe"), ".1f"), _fmt(r.get("nfe_equiv"), ".1f"),
               _fmt(r.get(quality[1]), quality[2])]
      if task == "infill":
        cells.append(_fmt(r.get("span_nll"), ".3f"))
      delta = ("-" if exact else f"{r['delta_nll']:+.3f} +- {r['delta_nll_se']:.3f}"
               if r["cache"] != "none" else "0")
      cells += ["-" if exact else _fmt(r.get("agree"), ".3f"), delta,
                _fmt(r.get("entropy"), ".2f")]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Load average (1, 5, 15 min) per timing round", ""]
  for r in meta["timing_rounds"]:
    lines.append(f"- {r['task']} round {r['round']} ({r['batches']} batches): "
                 f"{r['loadavg_before']} -> {r['loadavg_after']}")
  lines += ["", "## First continuation, decoded", ""]
  for name, text in examples.items():
    lines += [f"**{name}**: " + text.replace("\n", " / ").replace("|", "\\|")[:400], ""]
  return "\n".join(lines) + "\n"


def figure(table, path):
  """Per task: generated tokens/s (bars) and the quality measure (bars, the held-out text's as a
  line), one bar per sampler."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {"exact": "0.3", "tau=0.9": "tab:blue", "k=2": "tab:orange"}
  hatches = {"none": "", "prefix": "//", "dual": "xx"}
  fig, axes = plt.subplots(2, 2, figsize=(12, 7))
  for row_axes, task in zip(axes, ("continuation", "infill")):
    rows = [r for r in table[task] if "tokens_per_s" in r]
    data = next(r for r in table[task] if "tokens_per_s" not in r)
    labels = [r["sampler"].replace("confidence ", "").replace(" (cached, exact)", "\n(exact)")
              .replace(", ", "\n") for r in rows]
    key, name = (("gen_ppl", "gen PPL (AR evaluator)") if task == "continuation"
                 else ("infill_nll", "infill NLL (nats/token)"))
    for ax, values, ylabel in ((row_axes[0], [r["tokens_per_s"] for r in rows],
                                "generated tokens/s (wall, median)"),
                               (row_axes[1], [r[key] for r in rows], name)):
      bars = ax.bar(range(len(rows)), values, color=[colors[r["rule"]] for r in rows],
                    hatch=None, edgecolor="k")
      for bar, r in zip(bars, rows):
        bar.set_hatch(hatches[r["cache"]])
      ax.set_xticks(range(len(rows)), labels, fontsize=7)
      ax.set_ylabel(ylabel)
      ax.set_title(task)
    row_axes[1].axhline(data[key], color="k", ls=":", lw=1, label="held-out text")
    if task == "continuation":
      row_axes[1].set_yscale("log")
    row_axes[1].legend(fontsize=8)
  fig.suptitle("Fast-dLLM KV caches (hatched: // prefix, xx dual) vs the uncached confidence "
               "sampler and MDLM ancestral; blue: threshold 0.9, orange: 2 per step", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write(out, table, meta, examples):
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"meta": meta, "table": table, "examples": examples}, f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(table, meta, examples))
  if set(table) == set(TASKS):
    figure(table, os.path.join(out, "speed_quality.png"))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--denoiser", default="/work/runs/mdlm_default")
  p.add_argument("--evaluator", default="/work/runs/ar_default")
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--block", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--timing-batches", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tasks", nargs="+", default=list(TASKS))
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "fast_dllm"))
  p.add_argument("--replot", action="store_true",
                 help="rewrite results.md and the figure from --out/results.json only")
  args = p.parse_args()
  if args.replot:
    with open(os.path.join(args.out, "results.json")) as f:
      saved = json.load(f)
    write(args.out, saved["table"], saved["meta"], saved["examples"])
    return
  loaded, ev = load_run(args.denoiser), load_run(args.evaluator)
  if ev.tokenizer.fingerprint != loaded.tokenizer.fingerprint:
    raise SystemExit("the evaluator must share the denoiser's tokenizer (scored token by token)")
  schedule = loaded.config.noise.build()
  denoise = denoiser_from_model(loaded.model, schedule)
  mask_id = loaded.model.mask_id
  x0 = held_out(loaded, args.num)
  nll_of = ar_token_nll(ev.model)
  log = {"rounds": []}
  table, examples = {}, {}
  for task in args.tasks:
    res, vs = run_task(task, x0, denoise, schedule, mask_id, args, log)
    table[task] = score_task(task, x0, res, vs, nll_of, loaded.tokenizer, args)
    if task == "continuation":
      a, e = TASKS[task]
      examples["prompt"] = loaded.tokenizer.decode(x0[0, :a].tolist())
      examples["held-out text"] = loaded.tokenizer.decode(x0[0, a:e].tolist())
      for name in res:
        examples[name] = loaded.tokenizer.decode(res[name]["tokens"][0, a:e].tolist())
  argv = " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
  meta = {"denoiser": args.denoiser, "evaluator": args.evaluator, "step": loaded.step,
          "num": len(x0), "length": int(x0.shape[1]), "batch": args.batch, "block": args.block,
          "rounds": args.rounds, "backend": jax.default_backend(),
          "calls": -(-len(x0) // args.batch) + (args.rounds - 1) * args.timing_batches,
          "command": f"python experiments/fast_dllm/run.py {argv}".strip(),
          "timing_rounds": log["rounds"]}
  os.makedirs(args.out, exist_ok=True)
  write(args.out, table, meta, examples)
  print(markdown(table, meta, examples))


if __name__ == "__main__":
  main()
