"""Fine-tuning: starting a run from another run's weights (`train.init_from`).

  python -m mdlm.train experiment=meap_sft data.path=sft.jsonl train.init_from=runs/ar_pretrained

The first start of such a run takes the source's parameters (its EMA by default) and its tokenizer;
the optimizer state, EMA, step counter, RNG and data order are fresh. Everything is checked before
anything is written or compiled: the source must be a trained run, the new run must ask for the
same tokenizer and the same parameter shapes. The source run is only read. Once the new run holds
checkpoints of its own, it resumes from them and `init_from` is not read again (mdlm.train).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, NoReturn, Optional

import jax
from flax import nnx

from mdlm import checkpointing, models, objectives
from mdlm import config as config_lib
from mdlm import data as data_lib
from mdlm.data import tokenizers
from mdlm.config import ModelConfig
from mdlm.rundir import RunDir

log = logging.getLogger("mdlm.finetune")


# Fields of ModelConfig that decide the parameter shapes (with d_ff and num_kv_heads: see
# shape_diffs).
SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "mlp", "norm",
                "time_conditioning", "cond_dim", "tie_embeddings", "vocab_size", "scan_layers",
                "mlp_bias", "head_bias", "cond_bias", "cond_freq_dim", "adaln_without_time")
# Fields that keep the shapes but change the function the weights compute: allowed, with a warning
# that says what changes.
FUNCTION_FIELDS = {
    "kind": "the weights are reused as they are (e.g. AR -> diffusion adaptation)",
    "rope_theta": "the rotary frequencies change, so every position is encoded differently",
    # Positions are rotary: no parameter depends on the length, so a fine-tune may extend it.
    "max_seq_len": "no parameter depends on it (rotary positions); positions beyond the "
                   "source's length, if any, were never trained, so fine-tune at the new "
                   "data.seq_len",
    "norm_eps": "every normalisation divides by a slightly different scale",
    "time_input": "the timestep MLP reads other features of the time",
}


class InitFromError(ValueError):
  """train.init_from names something that cannot be fine-tuned from (refused before compiling)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A checked source run: where it is, which checkpoint and weights, its config and tokenizer."""

  path: str            # train.init_from as given
  run_dir: str
  step: int
  ema: bool
  config: Any          # the source's mdlm.config.Config
  tokenizer: Any
  model_cfg: ModelConfig  # the source's model, vocab_size resolved from its tokenizer


def _refuse(path: str, msg: str) -> NoReturn:
  raise InitFromError(f"train.init_from={path}: {msg}")


def resolve(tc: config_lib.TrainConfig) -> Source:
  """Finds the source run of `tc.init_from` and the checkpoint to start from.

  Reads only its config.yaml, tokenizer/ and checkpoint list; the weights are read by load_params.
  """
  path = tc.init_from
  fix = ("point train.init_from at a run directory written by `python -m mdlm.train` (with "
         "config.yaml, tokenizer/ and checkpoints/) or at one of its checkpoints/<step> "
         "directories, or drop train.init_from to train from scratch")
  try:
    run, path_step = RunDir.find(path)
  except FileNotFoundError as e:
    _refuse(path, f"{e} Fix: {fix}.")
  run_dir = run.path
  if path_step is not None and tc.init_from_step is not None and path_step != tc.init_from_step:
    _refuse(path, f"names checkpoint step {path_step} but train.init_from_step="
                  f"{tc.init_from_step}; drop one of the two.")
  step = tc.init_from_step if tc.init_from_step is not None else path_step
  try:
    src_cfg = run.load_config()
  except Exception as e:  # an unreadable or invalid config.yaml
    _refuse(path, f"cannot read {run_dir}/config.yaml ({e}). Fix: {fix}.")
  given = objectives.get(src_cfg.objective.name).given_runs(src_cfg.objective)
  if given:
    _refuse(path, f"{run_dir} trains a head over other runs (objective={src_cfg.objective.name}), "
                  "not a denoiser or AR model; fine-tune from one of them "
                  f"({' or '.join(given.values())}).")
  try:
    tokenizer = data_lib.load_tokenizer(run.tokenizer_dir)
  except (ValueError, OSError) as e:
    _refuse(path, f"the source's tokenizer cannot be read ({e}). Fix: {fix}.")
  try:
    steps = run.checkpoint_steps()
  except FileNotFoundError as e:
    _refuse(path, f"{e} Train the source run first (or finish it), or {fix}.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    _refuse(path, f"{run_dir}/checkpoints has no step {step}; it has {steps}. Set "
                  "train.init_from_step to one of them (or null for the latest).")
  model_cfg = src_cfg.model.replace(vocab_size=tokenizer.vocab_size)
  return Source(path, run_dir, int(step), tc.init_from_ema, src_cfg, tokenizer, model_cfg)


def check_tokenizer(cfg: config_lib.Config, source: Source) -> None:
  """The new run must ask for the tokenizer the source has: it is reused, never retrained."""
  t, src = cfg.tokenizer, source.tokenizer
  if cfg.data.source == "arrayrecord":
    return  # shards carry their own tokenizer; the data pipeline refuses one that differs
  diffs = []
  if t.kind != src.kind:
    diffs.append(f"tokenizer.kind={t.kind} here, {src.kind} in the source")
  elif t.kind == "sentencepiece":
    if t.model_path:
      if tokenizers.load_sentencepiece_model(t.model_path).fingerprint != src.fingerprint:
        diffs.append(f"tokenizer.model_path={t.model_path} is not the source's sentencepiece "
                     "model")
    else:
      if t.vocab_size != src.vocab_size:
        diffs.append(f"tokenizer.vocab_size={t.vocab_size} here, {src.vocab_size} in the source")
      if t.model_type != source.config.tokenizer.model_type:
        diffs.append(f"tokenizer.model_type={t.model_type} here, "
                     f"{source.config.tokenizer.model_type} in the source")
  if diffs:
    sets = [f"tokenizer.kind={src.kind}"]
    if src.kind == "sentencepiece":
      sets += [f"tokenizer.vocab_size={src.vocab_size}",
               f"tokenizer.model_type={source.config.tokenizer.model_type}",
               "tokenizer.model_path=null"]
    _refuse(source.path,
            f"this run asks for a different tokenizer than the source's ({'; '.join(diffs)}); a "
            f"fine-tune reuses the source's tokenizer ({source.run_dir}/tokenizer). Set "
            f"{' '.join(sets)}, or drop train.init_from.")


def shape_diffs(new: ModelConfig, src: ModelConfig) -> list[tuple[str, Any, Any]]:
  """(field, new value, source value) for each shape-relevant field that differs.

  d_ff counts when its resolved width differs and it was set differently: a width that follows
  from a differing d_model or mlp is fixed by setting those (d_ff=0 means the default width).
  num_kv_heads likewise (0 means num_heads)."""
  names = [n for n in SHAPE_FIELDS
           if not (n == "cond_dim" and not (src.conditioned or new.conditioned))]
  diffs = [(n, getattr(new, n), getattr(src, n)) for n in names
           if getattr(new, n) != getattr(src, n)]
  if new.ff_dim != src.ff_dim and new.d_ff != src.d_ff:
    diffs.append(("d_ff", new.d_ff, src.d_ff))  # 0: the default width
  if new.kv_heads != src.kv_heads and new.num_kv_heads != src.num_kv_heads:
    diffs.append(("num_kv_heads", new.num_kv_heads, src.num_kv_heads))  # 0: num_heads
  return diffs


def check_model(model_cfg: ModelConfig, source: Source) -> None:
  """The new model must have the source's parameter shapes; refuses naming the fields and fix.

  model_cfg: the new run's model with vocab_size resolved."""
  src = source.model_cfg
  diffs = shape_diffs(model_cfg, src)
  if diffs:
    here = "; ".join(f"model.{n}={a} here, {b} in the source" for n, a, b in diffs)
    fix = " ".join(f"model.{n}={b}" for n, _, b in diffs)
    _refuse(source.path,
            f"the model's shape differs from the source run's ({here}). Set {fix} (the source's "
            f"values, from {source.run_dir}/config.yaml), or drop train.init_from.")
  # The fields above decide the shapes; comparing the parameter trees as well keeps this check
  # exact should a new field ever change them.
  shapes = lambda c: jax.tree.map(
      lambda x: f"{tuple(x.shape)} {x.dtype}",
      nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.build(c)))))
  a, b = shapes(model_cfg), shapes(src)
  if a != b:
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    odd = [jax.tree_util.keystr(k) for k in sorted(set(flat_a) ^ set(flat_b), key=str)]
    odd += [f"{jax.tree_util.keystr(k)}: {flat_a[k]} vs {flat_b[k]}"
            for k in flat_a if k in flat_b and flat_a[k] != flat_b[k]]
    _refuse(source.path, f"the model's parameters differ from the source run's "
                         f"({'; '.join(odd[:5])}). Use the source's model settings "
                         f"({source.run_dir}/config.yaml), or drop train.init_from.")
  for n, consequence in FUNCTION_FIELDS.items():
    if getattr(model_cfg, n) != getattr(src, n):
      log.warning("train.init_from: model.%s=%s here, %s in the source %s: %s.", n,
                  getattr(model_cfg, n), getattr(src, n), source.run_dir, consequence)


def copy_tokenizer(source: Source, run_dir: str) -> None:
  """Copies the source's tokenizer/ into the new run (atomically), so that it is loaded there,
  never retrained. An existing tokenizer/ (an earlier start that stopped before its first
  checkpoint) is kept if it is the same tokenizer, else refused."""
  dst = RunDir(run_dir).tokenizer_dir
  if os.path.isdir(dst) and os.listdir(dst):
    try:
      same = data_lib.load_tokenizer(dst).fingerprint == source.tokenizer.fingerprint
    except ValueError:
      same = False
    if not same:
      _refuse(source.path, f"{dst} already holds a different tokenizer than the source's; "
                           "choose a new run directory (hydra.run.dir=...) or remove it.")
    return
  tmp = f"{dst}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(RunDir(source.run_dir).tokenizer_dir, tmp)
  if os.path.isdir(dst):
    os.rmdir(dst)  # empty
  os.replace(tmp, dst)


def load_params(source: Source, params_abs, shardings):
  """The source's weights (EMA or raw) as a pure dict, restored straight into `shardings`."""
  try:
    params, _ = checkpointing.restore_params(RunDir(source.run_dir).checkpoints_dir, params_abs,
                                             ema=source.ema, step=source.step,
                                             shardings=shardings)
  except Exception as e:  # orbax raises many kinds: unreadable files, a truncated save, ...
    others = [s for s in RunDir(source.run_dir).checkpoint_steps() if s != source.step]
    alt = (f"set train.init_from_step to another step ({others})" if others
           else "re-train the source run")
    _refuse(source.path, f"checkpoint step {source.step} of {source.run_dir} is unreadable "
                         f"({type(e).__name__}: {str(e)[:300]}). Fix: {alt}, or point "
                         "train.init_from at another run. The source was not changed.")
  return params


def write_provenance(source: Source, run_dir: str) -> dict:
  """<run_dir>/init_from.json: exactly which weights the run started from (written once)."""
  record = {"init_from": source.path, "run_dir": source.run_dir, "step": source.step,
            "weights": "ema" if source.ema else "params",
            "objective": config_lib.objective(source.config), "model_kind": source.model_cfg.kind,
            "tokenizer_fingerprint": source.tokenizer.fingerprint}
  path = RunDir(run_dir).init_from_path
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(path + ".tmp", path)
  return record


def read_provenance(run_dir: str) -> Optional[dict]:
  path = RunDir(run_dir).init_from_path
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
