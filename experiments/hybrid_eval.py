"""Infilling with hybrid heads: masked-token NLL / accuracy and infill throughput.

Trains (through the CLI, `python -m mdlm.train`) a small denoiser and a small AR model on the
default corpus with one shared tokenizer, then the MARIA head over them (`experiment=maria`), and
scores on the held-out split:

  denoiser   MDLM's exact single-step conditional: -log p(x_i | xt) at every masked i, one pass
             (the positions are scored independently: the NLL of filling them all at once);
  PoE        the untrained MARIA head, (logits_AR(i-1) + logits_MLM(i)) / 2;
  MARIA      the trained head;
  AR         -log p_AR(x_i | x_<i): exact for suffix spans (no given token after the span); for
             the other settings it ignores the given right context (marked *).
PoE, MARIA and AR are teacher-forced left to right (the clean earlier tokens, masked or not, are
the context of the AR part): the chain-rule NLL of the masked tokens, i.e. the likelihood of what
MARIA infilling (without refresh) samples from.

Mask settings: exactly round(r (L-1)) random positions for r in RATIOS; a contiguous middle span
of SPAN tokens (at least one given token after it); the last SPAN tokens (suffix). Position 0 is
always given (no AR state precedes it).

Throughput: tokens filled per second (median of repeats after a warm-up) for MARIA's KV-cached
infilling vs MDLM ancestral and confidence infilling, on the same masked batch.

  python experiments/hybrid_eval.py                # train (or resume) + evaluate
  python experiments/hybrid_eval.py --skip-train   # evaluate existing runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mdlm.rundir import RunDir  # noqa: E402

RATIOS = (0.15, 0.3, 0.5, 0.7, 0.9)
SPANS = (16, 32)
SYSTEMS = ("denoiser", "PoE", "MARIA", "AR")


def _train(args, name, overrides, tokenizer_from=None, run=True):
  """Runs (or, with run=False, only describes) one training run; returns (run dir, command)."""
  run_dir = os.path.join(args.workdir, name)
  cmd = [sys.executable, "-m", "mdlm.train", *overrides, f"hydra.run.dir={run_dir}",
         "train.progress=false"]
  shown = "python " + " ".join(cmd[1:]).replace(REPO + os.sep, "")
  status = RunDir(run_dir).read_status() or {}
  if not run or status.get("state") == "finished":
    return run_dir, shown
  if tokenizer_from and not RunDir(run_dir).has_tokenizer():
    # One tokenizer for both backbones: the AR run starts from the denoiser run's tokenizer.
    shutil.copytree(RunDir(tokenizer_from).tokenizer_dir, RunDir(run_dir).tokenizer_dir)
  print(f"[{name}] {shown}", flush=True)
  t0 = time.time()
  subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=REPO))
  print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
  return run_dir, shown


def _model_overrides(args):
  return [f"tokenizer={args.tokenizer}", f"model.num_layers={args.layers}",
          f"model.d_model={args.width}",
          f"model.num_heads={args.heads}", f"data.seq_len={args.seq_len}",
          f"model.max_seq_len={args.seq_len}", f"train.batch_size={args.batch}",
          "model.dtype=float32"]  # the committed results were measured in float32


def train_all(args, run=True):
  common = _model_overrides(args)
  steps = [f"train.steps={args.steps}", f"train.eval_every={args.steps}",
           f"train.checkpoint_every={args.steps}", f"train.max_wall_minutes={args.max_minutes}"]
  den, c1 = _train(args, "denoiser", ["model=cpu_default", *common, *steps], run=run)
  ar, c2 = _train(args, "ar", ["model=ar", *common, *steps], tokenizer_from=den, run=run)
  m_steps = [f"train.steps={args.maria_steps}", f"train.eval_every={args.maria_steps}",
             f"train.checkpoint_every={args.maria_steps}"]
  maria, c3 = _train(args, "maria", ["experiment=maria", f"objective.denoiser_run={den}",
                                     f"objective.ar_run={ar}", f"tokenizer={args.tokenizer}",
                                     f"data.seq_len={args.seq_len}",
                                     f"train.batch_size={args.batch}", *m_steps], run=run)
  return den, ar, maria, [c1, c2, c3]


def mask_settings(seq_len):
  out = [(f"ratio {r:.2f}", "ratio", r) for r in RATIOS]
  out += [(f"middle span {k}", "span", k) for k in SPANS]
  out += [(f"suffix span {k}", "suffix", k) for k in SPANS]
  return out


def make_masks(kind, value, num, seq_len, rng):
  masked = np.zeros((num, seq_len), bool)
  for b in range(num):
    if kind == "ratio":
      count = int(round(value * (seq_len - 1)))
      masked[b, 1 + rng.choice(seq_len - 1, count, replace=False)] = True
    elif kind == "span":
      start = rng.integers(1, seq_len - value)  # <= L - k - 1: a given token follows the span
      masked[b, start:start + value] = True
    else:
      masked[b, seq_len - value:] = True
  return masked


def evaluate(args, den_dir, ar_dir, maria_dir):
  import jax
  from flax import nnx
  from mdlm import data as data_lib, evaluate as eval_lib
  from mdlm.models import hybrid
  from mdlm.objectives.maria import masked_token_scores
  from mdlm.rundir import load_config, load_run

  loaded = load_run(maria_dir)
  trained, tokenizer = loaded.model, loaded.tokenizer
  poe = hybrid.build_maria(trained.denoiser, trained.ar)
  den_cfg = load_config(den_dir)
  mask_id = trained.mask_id
  cache = os.path.join(args.workdir, "eval_cache")
  ds = data_lib.build_dataset(den_cfg.data, tokenizer, split="val", batch_size=args.eval_batch,
                              seed=0, cache_dir=cache, shuffle=False, num_epochs=1)
  rows = [b["tokens"][b["token_mask"].all(1)] for b in ds]
  x0_all = np.concatenate(rows)[: args.eval_sequences]
  n, seq_len = x0_all.shape
  print(f"held-out: {n} sequences of {seq_len} tokens (V = {tokenizer.vocab_size})", flush=True)

  @nnx.jit
  def score(trained, poe, x0, xt, counted):
    h_ar_prev = trained.ar_states(x0)   # h_AR(i - 1); zero at i = 0 (never scored)
    h_mlm = trained.mlm_states(xt)
    ar_logits = trained.ar.logits(h_ar_prev)          # the AR model's prediction of x_i
    den_logits = trained.denoiser.logits(h_mlm)       # the denoiser's p(x_i | xt)
    out = {}
    for name, logits in (("denoiser", den_logits), ("PoE", poe.combine(h_ar_prev, h_mlm)),
                         ("MARIA", trained.combine(h_ar_prev, h_mlm)), ("AR", ar_logits)):
      out[name] = masked_token_scores(logits, x0, counted)
    return out

  rng = np.random.default_rng(args.seed)
  table = {}
  for label, kind, value in mask_settings(seq_len):
    masked = make_masks(kind, value, n, seq_len, rng)
    xt_all = np.where(masked, mask_id, x0_all).astype(np.int32)
    sums = {s: [[], [], []] for s in SYSTEMS}
    for i in range(0, n, args.eval_batch):
      sl = slice(i, min(i + args.eval_batch, n))
      x0, xt, cnt = x0_all[sl], xt_all[sl], masked[sl]
      pad = args.eval_batch - len(x0)
      if pad:  # keep one compiled shape: repeat the first row, counting nothing there
        x0, xt = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (x0, xt))
        cnt = np.concatenate([cnt, np.zeros((pad, seq_len), bool)])
      out = jax.device_get(score(trained, poe, x0, xt, cnt))
      for s in SYSTEMS:
        for j in range(3):
          sums[s][j].append(np.asarray(out[s][j])[: len(x0) - pad])
    table[label] = {}
    for s in SYSTEMS:
      nll_b, cor_b, cnt_b = (np.concatenate(v) for v in sums[s])
      nll, se = eval_lib.ratio_with_stderr(nll_b, cnt_b)
      table[label][s] = {"nll": nll, "nll_stderr": se, "acc": float(cor_b.sum() / cnt_b.sum()),
                         "masked_tokens": int(cnt_b.sum())}
    print(label, {s: round(table[label][s]["nll"], 3) for s in SYSTEMS}, flush=True)
  return table, trained, x0_all, mask_id, den_cfg


def throughput(args, trained, x0_all, mask_id, den_cfg):
  import jax
  from mdlm import sampling
  from mdlm.sampling.maria import maria_infill

  schedule = den_cfg.noise.build()
  denoise = sampling.denoiser_from_model(trained.denoiser, schedule)
  rng = np.random.default_rng(args.seed + 1)
  x0 = x0_all[: args.speed_batch]
  seq_len = x0.shape[1]
  results = {"load_average_before": os.getloadavg()[0]}
  for label, kind, value in (("ratio 0.50", "ratio", 0.5), ("middle span 32", "span", 32)):
    masked = make_masks(kind, value, len(x0), seq_len, rng)
    xt = np.where(masked, mask_id, x0).astype(np.int32)
    m = int(masked.sum(1).max())
    runs = {
        "MARIA (KV cache)": lambda k: maria_infill(k, trained, xt, mask_id=mask_id),
        "MARIA, refresh every 8": lambda k: maria_infill(k, trained, xt, mask_id=mask_id,
                                                                refresh_every=8),
        f"MDLM ancestral, T={m}": lambda k: sampling.ancestral(k, denoise, xt, steps=m,
                                                               schedule=schedule, mask_id=mask_id),
        f"MDLM ancestral, T={4 * m}": lambda k: sampling.ancestral(
            k, denoise, xt, steps=4 * m, schedule=schedule, mask_id=mask_id),
        f"confidence, {m} steps": lambda k: sampling.confidence(k, denoise, xt, steps=m,
                                                                mask_id=mask_id),
        f"confidence, {max(m // 4, 1)} steps": lambda k: sampling.confidence(
            k, denoise, xt, steps=max(m // 4, 1), mask_id=mask_id),
    }
    results[label] = {}
    for name, fn in runs.items():
      tokens, stats = fn(jax.random.key(0))  # warm-up (compilation)
      jax.block_until_ready(tokens)
      times = []
      for r in range(args.repeats):
        t0 = time.perf_counter()
        tokens, stats = fn(jax.random.key(r + 1))
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - t0)
      tokens = np.asarray(tokens)
      assert (tokens[~masked] == x0[~masked]).all() and (tokens != mask_id).all(), name
      filled = int(masked.sum())
      nfe = stats.get("nfe", stats.get("denoiser_passes"))
      results[label][name] = {"seconds": float(np.median(times)),
                              "tokens_per_s": filled / float(np.median(times)),
                              "filled": filled, "denoiser_calls": int(np.max(np.asarray(nfe))),
                              "ar_steps": int(stats.get("ar_steps", 0))}
      print(label, name, f"{results[label][name]['tokens_per_s']:.0f} tok/s", flush=True)
  results["load_average_after"] = os.getloadavg()[0]
  return results


def write_outputs(args, table, speed, commands, runs):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"nll": table, "throughput": speed, "commands": commands, "runs": runs,
               "args": vars(args)}, f, indent=1)

  lines = ["# Infilling with hybrid heads (held-out split of the default corpus)", "",
           "Masked-token NLL in nats per masked token (± standard error over sequences) and "
           "argmax accuracy. AR values marked * ignore the given right context (not an "
           "infilling model there); for suffix spans AR is exact.", "",
           "| mask setting | " + " | ".join(SYSTEMS) + " |",
           "|---|" + "---|" * len(SYSTEMS)]
  for label, row in table.items():
    cells = []
    for s in SYSTEMS:
      r = row[s]
      star = "*" if s == "AR" and not label.startswith("suffix") else ""
      cells.append(f"{r['nll']:.3f} ± {r['nll_stderr']:.3f}{star} ({100 * r['acc']:.1f}%)")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", "Infill throughput on this CPU (batch of "
            f"{args.speed_batch}, median of {args.repeats} after a warm-up):", "",
            "| mask setting | sampler | tokens/s | s / batch | denoiser calls | AR steps |",
            "|---|---|---|---|---|---|"]
  for label, row in speed.items():
    if not isinstance(row, dict):
      continue
    for name, r in row.items():
      lines.append(f"| {label} | {name} | {r['tokens_per_s']:.0f} | {r['seconds']:.3f} | "
                   f"{r['denoiser_calls']} | {r['ar_steps']} |")
  if "load_average_before" in speed:
    lines += ["", f"1-minute load average of this shared 2-core machine: "
              f"{speed['load_average_before']:.1f} before, {speed['load_average_after']:.1f} after "
              "the timings (other jobs were running: compare rows, not absolute figures)."]
  lines += ["", "Runs (status.json): " + "; ".join(
      f"{name}: {st.get('state')} at step {st.get('step')}/{st.get('steps')}"
      + (f", val/nll {st['val/nll']:.3f}" if "val/nll" in st else ", no final evaluation")
      + f", {st.get('wall_time', 0) / 60:.1f} min" for name, st in runs.items()) + ".",
            "(val/nll: the denoiser's NELBO per token, the AR model's NLL per token, MARIA's "
            "cross-entropy per masked token.)"]
  lines += ["", "Commands (finished runs are reused; --skip-train scores existing runs):", "",
            "```", "python experiments/hybrid_eval.py   # runs the following, then scores and times",
            *commands, "```"]
  notes = os.path.join(args.out, "notes.md")
  if os.path.exists(notes):  # hand-written reading of the figures, kept across re-renders
    lines += ["", open(notes).read().strip()]
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  ratios = [f"ratio {r:.2f}" for r in RATIOS]
  for s, style in zip(SYSTEMS, ("o-", "s-", "^-", "x--")):
    ax1.errorbar(RATIOS, [table[k][s]["nll"] for k in ratios],
                 yerr=[table[k][s]["nll_stderr"] for k in ratios], fmt=style,
                 label=s + (" (left context only)" if s == "AR" else ""), capsize=3)
  ax1.set_xlabel("mask ratio")
  ax1.set_ylabel("NLL per masked token (nats)")
  ax1.set_title("Held-out masked-token NLL")
  ax1.legend()
  ax1.grid(alpha=0.3)
  row = speed["ratio 0.50"]  # dict of sampler -> figures
  names = list(row)
  ax2.barh(names, [row[k]["tokens_per_s"] for k in names],
           color=["C2" if k.startswith("MARIA") else "C0" for k in names])
  ax2.set_xscale("log")
  ax2.set_xlabel("infilled tokens / s (log scale)")
  ax2.set_title(f"Infill throughput, ratio 0.5, batch {args.speed_batch}")
  ax2.invert_yaxis()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "hybrid_eval.png"), dpi=120)
  print(f"wrote {args.out}/results.md, results.json, hybrid_eval.png")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=os.path.join(REPO, "runs", "hybrid_eval"))
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "hybrid"))
  p.add_argument("--steps", type=int, default=1500, help="backbone training steps")
  p.add_argument("--maria-steps", type=int, default=400)
  p.add_argument("--max-minutes", type=float, default=10.0, help="wall cap per backbone run")
  p.add_argument("--tokenizer", default="char",
                 help="tokenizer preset (configs/tokenizer): char, byte or sentencepiece")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--eval-batch", type=int, default=64)
  p.add_argument("--eval-sequences", type=int, default=512)
  p.add_argument("--speed-batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-train", action="store_true", help="evaluate the existing runs")
  p.add_argument("--render-only", action="store_true",
                 help="rewrite results.md and the plot from results.json")
  args = p.parse_args()
  den, ar, maria, commands = train_all(args, run=not (args.skip_train or args.render_only))
  if args.render_only:
    saved = json.load(open(os.path.join(args.out, "results.json")))
    table, speed = saved["nll"], saved["throughput"]
  else:
    table, trained, x0_all, mask_id, den_cfg = evaluate(args, den, ar, maria)
    speed = throughput(args, trained, x0_all, mask_id, den_cfg)
  runs = {name: RunDir(d).read_status()
          for name, d in (("denoiser", den), ("AR", ar), ("MARIA", maria))}
  write_outputs(args, table, speed, commands, runs)


if __name__ == "__main__":
  main()
