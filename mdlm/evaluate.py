"""Likelihood evaluation: NELBO (masked diffusion) or exact NLL (AR) with standard errors.

`python -m mdlm.evaluate run=<run dir or checkpoint> [split=val] [time_samples=4]
[max_batches=null] [data.source=text data.path=...] [output=eval.json]`

The diffusion NELBO is a Monte Carlo estimate: each sequence gets `time_samples` independent draws
of (t, xt); the standard error is over sequences (delta method for the ratio of summed nats to
summed tokens). Bits per character divide the total nats by the characters of the evaluated text,
so models with different tokenizers compare on the same text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mdlm import diffusion, objectives, sharding


def make_eval_step(merge: Callable, ctx: objectives.Context, objective: str, time_samples: int,
                   mesh, param_shardings=None):
  """Jitted (params, batch, key) -> (nll_sum_B averaged over time samples, num_tokens_B)."""
  objective_fn = objectives.get(objective)
  batch_sh = sharding.batch_sharding(mesh)
  samples = 1 if objective == "ar" else int(time_samples)

  def eval_fn(params, batch, key):
    model = merge(params)

    def one(i):
      return objective_fn(model, batch, jax.random.fold_in(key, i), ctx)

    first = one(0)
    if samples == 1:
      return first.nll_sum_B, first.num_tokens_B

    # Counts are averaged with the sums: where the denominator depends on the draw (maria: the
    # masked tokens), sum(nll) / sum(count) stays a per-counted-token mean over all draws; where
    # it does not (diffusion: real tokens), the mean count is that count.
    def add(i, acc):
      terms = one(i)
      return acc[0] + terms.nll_sum_B, acc[1] + terms.num_tokens_B

    nll_B, count_B = jax.lax.fori_loop(1, samples, add, (first.nll_sum_B, first.num_tokens_B))
    return nll_B / samples, count_B / samples

  # One batch sharding for every array of the batch (a pytree prefix; MEAP-SFT adds labels).
  in_sh = (param_shardings, batch_sh, None)
  return jax.jit(eval_fn, in_shardings=in_sh if param_shardings is not None else None)


def ratio_with_stderr(nll_sums, counts) -> tuple[float, float]:
  """R = sum(nll) / sum(tokens) and its standard error over sequences (delta method)."""
  nll_sums, counts = np.asarray(nll_sums, np.float64), np.asarray(counts, np.float64)
  keep = counts > 0
  nll_sums, counts = nll_sums[keep], counts[keep]
  n = len(counts)
  if n == 0:
    raise ValueError("No tokens to evaluate.")
  ratio = nll_sums.sum() / counts.sum()
  if n < 2:
    return float(ratio), float("nan")
  resid = nll_sums - ratio * counts
  stderr = math.sqrt(np.sum(resid ** 2) * n / (n - 1)) / counts.sum()
  return float(ratio), float(stderr)


def pad_rows(batch: dict, rows: int) -> dict:
  """Pads a short final batch with all-padding rows (they carry zero tokens; their labels, if
  any, are IGNORE, not token 0)."""
  from mdlm.meap import IGNORE
  n = batch["tokens"].shape[0]
  if n == rows:
    return batch
  return {k: np.concatenate([v, np.full((rows - n,) + v.shape[1:], IGNORE if k == "labels" else 0,
                                        v.dtype)])
          for k, v in batch.items()}


def _to_host(x) -> np.ndarray:
  """A (possibly multi-host, batch-sharded) array as one numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def evaluate_batches(eval_step, params, batches, mesh, rows: int, key,
                     max_batches: Optional[int] = None, progress: bool = False) -> dict:
  """Runs `eval_step` over an iterable of host batches; returns nll (nats/token), its standard
  error, perplexity, bits per token, and the sequence / token counts."""
  nll_sums, counts = [], []
  iterator = batches
  if progress:
    from tqdm.auto import tqdm
    iterator = tqdm(batches, total=max_batches, desc="eval", file=sys.stderr)
  for i, batch in enumerate(iterator):
    if max_batches is not None and i >= max_batches:
      break
    s, c = eval_step(params, sharding.global_batch(pad_rows(batch, rows), mesh),
                     jax.random.fold_in(key, i))
    # Padding rows carry zero tokens and drop out in ratio_with_stderr.
    nll_sums.append(_to_host(s))
    counts.append(_to_host(c))
  if not nll_sums:
    raise ValueError("The evaluation data yielded no batch: the split is empty or smaller than "
                     "one row; raise data.val_fraction or use a larger corpus.")
  sums, cnt = np.concatenate(nll_sums), np.concatenate(counts)
  nll, se = ratio_with_stderr(sums, cnt)
  out = diffusion.summarize(nll, 1.0)
  return {"nll": nll, "nll_stderr": se, "ppl": out["ppl"], "bpt": out["bpt"],
          "bpt_stderr": se / math.log(2), "sequences": int((cnt > 0).sum()),
          "tokens": float(cnt.sum()), "nats": float(sums.sum())}


# ----------------------------------------------------------------------------- CLI


@dataclass
class EvalConfig:
  """`run`: a run directory or checkpoint step directory. `data`: overrides of the run's data
  config (e.g. data.source=text data.path=other.txt for zero-shot perplexity)."""

  run: str = "???"
  split: str = "val"
  ema: bool = True
  step: Optional[int] = None
  time_samples: int = 4
  max_batches: Optional[int] = None
  batch_size: int = 32
  seed: int = 0
  output: Optional[str] = None   # default: <run>/eval_<split>[_<source>].json
  data: dict = field(default_factory=dict)


def evaluate_run(ecfg: EvalConfig) -> dict:
  from flax import nnx
  from omegaconf import OmegaConf
  from mdlm import checkpointing, data as data_lib
  from mdlm import config as config_lib

  if ecfg.split not in ("train", "val"):
    raise ValueError(f"split={ecfg.split!r}; choose val or train.")
  if ecfg.time_samples < 1 or ecfg.batch_size < 1:
    raise ValueError("time_samples and batch_size must be >= 1.")
  loaded = checkpointing.load_run(ecfg.run, ema=ecfg.ema, step=ecfg.step)
  cfg = loaded.config
  data_cfg = cfg.data
  if ecfg.data:
    merged = OmegaConf.merge(OmegaConf.structured(cfg.data), OmegaConf.create(dict(ecfg.data)))
    data_cfg = OmegaConf.to_object(merged)
    config_lib.validate(dataclasses.replace(cfg, data=data_cfg))
  model = loaded.model
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def merge(p):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)

  objective = objectives.EVAL_OBJECTIVE.get(config_lib.objective(cfg), config_lib.objective(cfg))
  ctx = objectives.Context(schedule=cfg.noise.build(), mask_id=model.mask_id,
                           pad_layout=data_cfg.layout == "pad", t_min=cfg.noise.t_min,
                           num_steps=cfg.noise.num_steps, antithetic=cfg.noise.antithetic)
  mesh = sharding.make_mesh(-1, 1, 1)
  rows = ecfg.batch_size
  if rows % sharding.batch_divisor(mesh):
    raise ValueError(f"batch_size={rows} must be divisible by the device count.")
  cache_dir = data_cfg.cache_dir or os.path.join(loaded.run_dir, "data_cache")
  ds = data_lib.build_dataset(data_cfg, loaded.tokenizer, split=ecfg.split, batch_size=rows,
                              seed=ecfg.seed, cache_dir=cache_dir, shuffle=False, num_epochs=1)
  step_fn = make_eval_step(merge, ctx, objective, ecfg.time_samples, mesh)
  result = evaluate_batches(step_fn, params, ds, mesh, rows, jax.random.key(ecfg.seed),
                            ecfg.max_batches, progress=True)
  stats = data_lib.split_stats(data_cfg, loaded.tokenizer, ecfg.split, cache_dir)
  if stats.get("num_chars") and stats.get("num_tokens"):
    chars_per_token = stats["num_chars"] / stats["num_tokens"]
    result["bpc"] = result["bpt"] / chars_per_token
    result["chars_per_token"] = chars_per_token
  result.update(run=loaded.run_dir, step=loaded.step, split=ecfg.split, objective=objective,
                ema=ecfg.ema, time_samples=ecfg.time_samples if objective != "ar" else 1,
                data_source=data_cfg.source, data_path=data_cfg.path)
  output = ecfg.output or os.path.join(
      loaded.run_dir, f"eval_{ecfg.split}" + (f"_{data_cfg.source}" if ecfg.data else "") + ".json")
  with open(output, "w") as f:
    json.dump(result, f, indent=1)
  result["output"] = output
  return result


def main(argv=None) -> int:
  from omegaconf import OmegaConf
  argv = sys.argv[1:] if argv is None else argv
  if any(a in ("-h", "--help") for a in argv):
    print(__doc__)
    return 0
  try:
    schema = OmegaConf.structured(EvalConfig)
    ecfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(list(argv))))
    if ecfg.run == "???":
      raise ValueError("pass run=<run directory or checkpoint directory>")
    result = evaluate_run(ecfg)
  except Exception as e:  # every failure is a one-line message, never a traceback wall
    print(f"mdlm.evaluate: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  unit = "NELBO" if result["objective"] == "diffusion" else "NLL"
  print(f"{unit} {result['nll']:.4f} ± {result['nll_stderr']:.4f} nats/token | "
        f"PPL {result['ppl']:.2f} | {result['bpt']:.4f} bits/token"
        + (f" | {result['bpc']:.4f} bits/char" if "bpc" in result else "")
        + f" | {result['sequences']} sequences, {result['tokens']:.0f} tokens")
  print(f"wrote {result['output']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
