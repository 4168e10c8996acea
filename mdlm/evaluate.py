"""Likelihood evaluation of a trained run with the measures that apply to it (mdlm.measures).

  python -m mdlm.evaluate run=<run dir or checkpoint> [measures=[nelbo,pll,masked]]
      [split=val] [time_samples=4] [max_batches=null] [data.source=text data.path=...]

Monte Carlo measures (the NELBO, masked-token NLL) average `time_samples` independent draws per
sequence; the standard error is over sequences (delta method for the ratio of summed nats to
summed tokens). Bits per character divide the total nats by the characters of the evaluated text,
so models with different tokenizers compare on the same text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import hydra
import jax
import numpy as np
from flax import nnx
from hydra.core.config_store import ConfigStore
from jax.experimental import multihost_utils
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mdlm import checkpointing, cli, diffusion, objectives, sharding
from mdlm import config as config_lib
from mdlm import data as data_lib
from mdlm import measures as measures_lib
from mdlm.data.sft import IGNORE
from mdlm.rundir import RunDir, load_run


def make_eval_step(merge: Callable, measure: measures_lib.Measure, setup: objectives.Setup,
                   time_samples: int, mesh, param_shardings=None):
  """Jitted (params, batch, key) -> (nll_sum_B averaged over draws, count_B) of one measure."""
  batch_sh = sharding.batch_sharding(mesh)
  samples = int(time_samples) if measure.stochastic else 1

  @sharding.activation_sharding(mesh)
  def eval_fn(params, batch, key):
    model = merge(params)

    def one(i):
      return measure.fn(model, batch, jax.random.fold_in(key, i), setup)

    first = one(0)
    if samples == 1:
      return first.nll_sum_B, first.num_tokens_B

    # Counts are averaged with the sums: where the denominator depends on the draw (masked
    # tokens), sum(nll) / sum(count) stays a per-counted-token mean over all draws; where it does
    # not (the NELBO's real tokens), the mean count is that count.
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
  n = batch["tokens"].shape[0]
  if n == rows:
    return batch
  return {k: np.concatenate([v, np.full((rows - n,) + v.shape[1:], IGNORE if k == "labels" else 0,
                                        v.dtype)])
          for k, v in batch.items()}


def _to_host(x) -> np.ndarray:
  """A (possibly multi-host, batch-sharded) array as one numpy array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def evaluate_batches(eval_step, params, batches, mesh, rows: int, key,
                     max_batches: Optional[int] = None, progress: bool = False,
                     total: Optional[int] = None, desc: str = "eval",
                     count_chars: Optional[Callable] = None) -> dict:
  """Runs `eval_step` over an iterable of host batches; returns nll (nats per counted unit), its
  standard error, perplexity, bits per unit, and the sequence / unit counts. With
  count_chars(batch) -> characters of each row's scored text, also bits per character: the
  total nats over the total characters of exactly the text that was scored."""
  nll_sums, counts, chars = [], [], 0
  iterator = batches
  if progress:
    iterator = tqdm(batches, total=total if total is not None else max_batches, desc=desc,
                    file=sys.stderr)
  for i, batch in enumerate(iterator):
    if max_batches is not None and i >= max_batches:
      break
    s, c = eval_step(params, sharding.global_batch(pad_rows(batch, rows), mesh),
                     jax.random.fold_in(key, i))
    if count_chars is not None:
      chars += int(np.sum(count_chars(batch)))
    # Padding rows carry zero tokens and drop out in ratio_with_stderr.
    nll_sums.append(_to_host(s))
    counts.append(_to_host(c))
  if not nll_sums:
    raise ValueError("The evaluation data yielded no batch: the split is empty or smaller than "
                     "one row; raise data.val_fraction or use a larger corpus.")
  sums, cnt = np.concatenate(nll_sums), np.concatenate(counts)
  nll, se = ratio_with_stderr(sums, cnt)
  out = diffusion.summarize(nll, 1.0)
  result = {"nll": nll, "nll_stderr": se, "ppl": out["ppl"], "bpt": out["bpt"],
            "bpt_stderr": se / math.log(2), "sequences": int((cnt > 0).sum()),
            "tokens": float(cnt.sum()), "nats": float(sums.sum())}
  if chars > 0:
    result.update(chars=chars, bpc=float(sums.sum()) / math.log(2) / chars)
  return result


# ----------------------------------------------------------------------------- a run


def _optional_fields(cls) -> list:
  hints = typing.get_type_hints(cls)
  return [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(cls)]


# data.* of an evaluation: any DataConfig key; null (the default) keeps the run's value.
EvalDataConfig = dataclasses.make_dataclass("EvalDataConfig",
                                            _optional_fields(config_lib.DataConfig))


@dataclass
class EvalConfig:
  """`python -m mdlm.evaluate run=<run dir or checkpoint> [key=value ...]`.

  run: a run directory or one of its checkpoints/<step> directories. measures: which measures
  (mdlm.measures: nelbo, ar, pll, masked (= masked15, masked40, masked80), maria); empty: the
  measure each objective of the run reports in training. data: overrides of the run's data config
  (e.g. data.source=text data.path=other.txt for zero-shot perplexity)."""

  run: str = "???"
  split: str = "val"
  ema: bool = True
  step: Optional[int] = None
  measures: List[str] = field(default_factory=list)
  time_samples: int = 4
  max_batches: Optional[int] = None
  batch_size: int = 32
  seed: int = 0
  output: Optional[str] = None   # default: <run>/eval_<split>[_<source>].json
  progress: bool = True
  data: EvalDataConfig = field(default_factory=EvalDataConfig)


def applicable_measures(cfg) -> list[str]:
  """Every measure that applies to a model trained like `cfg` (all its objectives')."""
  names = [m for s in objectives.run_objectives(cfg) for m in objectives.get(s.name).measures]
  return measures_lib.expand(names)


def default_measures(cfg) -> list[str]:
  return list(dict.fromkeys(objectives.get(s.name).measures[0]
                            for s in objectives.run_objectives(cfg)))


def _chosen_measures(ecfg: EvalConfig, cfg) -> list[str]:
  allowed = applicable_measures(cfg)
  chosen = measures_lib.expand(ecfg.measures) if ecfg.measures else default_measures(cfg)
  wrong = [m for m in chosen if m not in allowed]
  if wrong:
    trained = ", ".join(s.name for s in objectives.run_objectives(cfg))
    raise ValueError(f"measures {wrong} do not apply to a model trained with {trained}; this run "
                     f"can be scored with {allowed}.")
  return chosen


def _data_overrides(ecfg: EvalConfig) -> dict:
  data = ecfg.data if isinstance(ecfg.data, dict) else dataclasses.asdict(ecfg.data)
  return {k: v for k, v in data.items() if v is not None}


def _eval_data_config(ecfg: EvalConfig, cfg):
  overrides = _data_overrides(ecfg)
  if not overrides:
    return cfg.data
  data_cfg = dataclasses.replace(cfg.data, **overrides)
  config_lib.validate(dataclasses.replace(cfg, data=data_cfg))
  return data_cfg


def _num_batches(data_cfg, stats: dict, rows: int) -> Optional[int]:
  """Batches of a finite pass over a split (for the progress bar), when the layout tells."""
  if data_cfg.meap_sft:
    return None
  num_rows = (math.ceil(stats["num_tokens"] / data_cfg.seq_len) if data_cfg.layout == "wrap"
              else stats["num_documents"])
  return math.ceil(num_rows / rows)


def evaluate_run(ecfg: EvalConfig) -> dict:
  """Scores a trained run with each chosen measure; writes and returns the JSON record. The first
  measure's figures are also at the top level (nll, nll_stderr, ppl, bpt, bpc)."""
  if ecfg.split not in ("train", "val"):
    raise ValueError(f"split={ecfg.split!r}; choose val or train.")
  if ecfg.time_samples < 1 or ecfg.batch_size < 1:
    raise ValueError("time_samples and batch_size must be >= 1.")
  run, _ = RunDir.find(ecfg.run)
  cfg = run.load_config()
  chosen = _chosen_measures(ecfg, cfg)  # refused before any weights load
  data_cfg = _eval_data_config(ecfg, cfg)
  mesh = sharding.make_mesh(-1, 1, 1)
  rows = ecfg.batch_size
  if rows % sharding.batch_divisor(mesh):
    raise ValueError(f"batch_size={rows} must be divisible by the device count "
                     f"({sharding.batch_divisor(mesh)}).")
  loaded = load_run(ecfg.run, ema=ecfg.ema, step=ecfg.step)
  graphdef, state = nnx.split(loaded.model)
  params = nnx.to_pure_dict(state)

  def merge(p):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)

  setup = objectives.make_setup(dataclasses.replace(cfg, data=data_cfg),
                                loaded.tokenizer.vocab_size, loaded.tokenizer)
  cache_dir = data_cfg.cache_dir or run.data_cache_dir
  stats = data_lib.split_stats(data_cfg, loaded.tokenizer, ecfg.split, cache_dir)
  total = _num_batches(data_cfg, stats, rows)
  tokenizer = loaded.tokenizer
  if ecfg.max_batches is not None:
    total = min(total, ecfg.max_batches) if total is not None else ecfg.max_batches
  results = {}
  for name in chosen:
    ds = data_lib.build_dataset(data_cfg, loaded.tokenizer, split=ecfg.split, batch_size=rows,
                                seed=ecfg.seed, cache_dir=cache_dir, shuffle=False, num_epochs=1)
    measure = measures_lib.get(name)
    step_fn = make_eval_step(merge, measure, setup, ecfg.time_samples, mesh)
    count_chars = None
    if measure.unit == "token" and not data_cfg.meap_sft:
      count_chars = lambda b, m=measure: tokenizer.count_chars(
          b["tokens"], m.scored_tokens(b["token_mask"]))
    res = evaluate_batches(step_fn, params, ds, mesh, rows, jax.random.key(ecfg.seed),
                           ecfg.max_batches, progress=ecfg.progress, total=total, desc=name,
                           count_chars=count_chars)
    res.update(label=measure.label, unit=measure.unit,
               time_samples=ecfg.time_samples if measure.stochastic else 1)
    results[name] = res
  first = results[chosen[0]]
  result = dict(first, measure=chosen[0], measures=results, run=loaded.run_dir, step=loaded.step,
                split=ecfg.split, objective=config_lib.objective(cfg), ema=ecfg.ema,
                data_source=data_cfg.source, data_path=data_cfg.path)
  output = ecfg.output or run.join(
      f"eval_{ecfg.split}" + (f"_{data_cfg.source}" if _data_overrides(ecfg) else "") + ".json")
  with open(output, "w") as f:
    json.dump(result, f, indent=1)
  result["output"] = output
  return result


# ----------------------------------------------------------------------------- CLI


def _report(result: dict) -> str:
  lines = []
  for name, r in result["measures"].items():
    per = r["unit"]
    line = (f"{r['label']} {r['nll']:.4f} ± {r['nll_stderr']:.4f} nats/{per} | "
            f"{'pseudo-' if name == 'pll' else ''}PPL {r['ppl']:.2f} | {r['bpt']:.4f} bits/{per}")
    if "bpc" in r:
      line += f" | {r['bpc']:.4f} bits/char"
    lines.append(line + f" | {r['sequences']} sequences, {r['tokens']:.0f} {per}s")
  return "\n".join(lines)


def register_configs() -> None:
  ConfigStore.instance().store(name="base_evaluate", node=EvalConfig)


def _hydra_main():
  register_configs()
  cli.register_help_resolver()

  @hydra.main(version_base=None, config_path=_config_path(), config_name="evaluate")
  def main(hydra_cfg) -> None:
    cli.setup_logging()
    try:
      ecfg = OmegaConf.to_object(hydra_cfg)
      if ecfg.run in (None, "", "???"):
        raise ValueError("pass run=<run directory or checkpoint directory>")
      result = evaluate_run(ecfg)
    except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
      raise SystemExit(f"mdlm.evaluate: {e}")
    print(_report(result))
    print(f"wrote {result['output']}")

  main()


def _config_path() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


if __name__ == "__main__":
  _hydra_main()
