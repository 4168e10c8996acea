"""Checkpoints (orbax) and loading a trained run for evaluation and sampling.

A checkpoint holds the train state (parameters, optimizer state, EMA, step, RNG key), the data
iterator's state and a small metadata record. Saves are asynchronous; the manager keeps the last K
checkpoints plus the best one by validation loss. Restoring walks back from the newest step when a
checkpoint is unreadable, with a warning, so a corrupt or partial latest save never blocks resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

log = logging.getLogger(__name__)
BEST_METRIC = "val_nll"


class CheckpointError(RuntimeError):
  pass


def manager(directory: str, *, keep: int = 2, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  policy = AnyPreservationPolicy([
      LatestN(n=keep),
      BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
            keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data", "meta"))


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict,
         metrics: Optional[dict] = None) -> None:
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, *, step: Optional[int] = None):
  """Returns (step, state, data_state, meta) from the newest readable checkpoint, or None.

  With `step`, restores exactly that step (and raises if it is unreadable).
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {mgr.directory}; have {steps}.")
    steps = [step]
  for s in steps:
    try:
      out = mgr.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
      return s, out["state"], out["data"], out["meta"]
    except Exception as e:  # a truncated or corrupt save: fall back to the previous one
      if _is_mismatch(e):
        raise CheckpointError(
            f"Checkpoint step {s} in {mgr.directory} does not match the current model/optimizer "
            f"configuration ({str(e)[:300]}). Resume with the run's own config.yaml, or start a "
            "new run directory.") from e
      if step is not None:
        raise CheckpointError(f"Checkpoint step {s} in {mgr.directory} is unreadable: {e}") from e
      quarantine = _quarantine(mgr, s)
      msg = (f"Checkpoint step {s} in {mgr.directory} is unreadable ({type(e).__name__}: "
             f"{str(e)[:200]}); moved it to {quarantine} and fell back to the previous one.")
      warnings.warn(msg)
      log.warning(msg)
  return None


def _is_mismatch(e: Exception) -> bool:
  text = str(e)
  return isinstance(e, ValueError) and ("tree structures do not match" in text or
                                        "not compatible with the stored shape" in text)


def _quarantine(mgr: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step aside (never deletes it) so training can write that step again."""
  import shutil
  src = os.path.join(str(mgr.directory), str(step))
  dst_root = os.path.join(os.path.dirname(str(mgr.directory)), "checkpoints_unreadable")
  os.makedirs(dst_root, exist_ok=True)
  dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
  shutil.move(src, dst)
  mgr.reload()
  return dst


class LoadedRun(NamedTuple):
  model: Any          # mdlm.models.Transformer with the restored (EMA by default) weights
  tokenizer: Any
  config: Any         # mdlm.config.Config
  step: int
  run_dir: str


def _find_run_dir(path: str) -> tuple[str, Optional[int]]:
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No run directory or checkpoint at {path}.")
  if os.path.exists(os.path.join(path, "config.yaml")):
    return path, None
  # A checkpoint step directory: <run_dir>/checkpoints/<step>
  parent = os.path.dirname(path)
  run_dir = os.path.dirname(parent)
  if os.path.basename(parent) == "checkpoints" and os.path.exists(
      os.path.join(run_dir, "config.yaml")):
    try:
      return run_dir, int(os.path.basename(path))
    except ValueError:
      pass
  raise FileNotFoundError(
      f"{path} is neither a run directory (with config.yaml) nor a checkpoint step directory "
      "(<run_dir>/checkpoints/<step>).")


def load_config(run_dir: str):
  from omegaconf import OmegaConf
  from mdlm import config as config_lib
  schema = OmegaConf.structured(config_lib.Config)
  cfg = OmegaConf.merge(schema, OmegaConf.load(os.path.join(run_dir, "config.yaml")))
  return config_lib.validate(OmegaConf.to_object(cfg))


def _read_only_manager(ckpt_dir: str) -> ocp.CheckpointManager:
  """A manager that only reads (the source of a fine-tune, a run being evaluated). orbax warns
  "Given directory is read only" through absl on creating one: expected here, so muted."""
  import absl.logging
  level = absl.logging.get_verbosity()
  absl.logging.set_verbosity(absl.logging.ERROR)
  try:
    return manager(ckpt_dir, read_only=True, async_save=False)
  finally:
    absl.logging.set_verbosity(level)


def _open_checkpoints(run_dir: str) -> tuple[ocp.CheckpointManager, list[int]]:
  """A read-only manager of the run's checkpoints and its steps, oldest first (the caller closes
  the manager); FileNotFoundError when there is none."""
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{run_dir} has no checkpoints/ directory; train it first.")
  mgr = _read_only_manager(ckpt_dir)
  steps = sorted(mgr.all_steps())
  if not steps:
    mgr.close()
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint.")
  return mgr, steps


def checkpoint_steps(run_dir: str) -> list[int]:
  """The saved steps of a run, oldest first; FileNotFoundError when it has none."""
  mgr, steps = _open_checkpoints(run_dir)
  mgr.close()
  return steps


def restore_params(run_dir: str, params_abs, *, ema: bool = True, step: Optional[int] = None,
                   shardings=None) -> tuple[Any, int]:
  """(parameters, step) of one checkpoint of a run: the EMA (or raw) weights as a pure dict.

  params_abs: pure dict of jax.ShapeDtypeStruct (the model's abstract parameters). shardings: a
  matching pure dict of shardings to restore straight into (default: all on the first device).
  step None: the newest readable checkpoint, older ones tried with a warning; an explicit step is
  restored exactly or raises CheckpointError. Read-only: nothing in the run is changed.
  """
  key = "ema" if ema else "params"
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, params_abs)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
  mgr, steps = _open_checkpoints(run_dir)
  last_error = None
  try:
    if step is not None and step not in steps:
      raise CheckpointError(f"{run_dir}/checkpoints has no step {step}; it has {steps}.")
    candidates = sorted(steps, reverse=True) if step is None else [step]
    for s in candidates:
      try:
        # Partial restore: only the one parameter tree asked for (no optimizer state, no copy of
        # the other tree), placed directly with the requested shardings.
        item = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={key: params_abs}, restore_args={key: restore_args}, partial_restore=True)))
        return item["state"][key], int(s)
      except Exception as e:
        if step is not None:
          raise CheckpointError(f"Checkpoint step {s} of {run_dir} is unreadable: {e}") from e
        warnings.warn(f"Checkpoint step {s} of {run_dir} is unreadable ({e}); trying an older "
                      "one.")
        last_error = e
  finally:
    mgr.close()
  raise CheckpointError(f"No readable checkpoint in {run_dir}/checkpoints: {last_error}")


def load_run(path: str, *, ema: bool = True, step: Optional[int] = None) -> LoadedRun:
  """Loads a trained model, its tokenizer and config from a run directory or checkpoint dir."""
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)
  from flax import nnx
  from mdlm import data as data_lib
  from mdlm import models
  run_dir, ckpt_step = _find_run_dir(path)
  step = step if step is not None else ckpt_step
  cfg = load_config(run_dir)
  tokenizer = data_lib.load_tokenizer(os.path.join(run_dir, "tokenizer"))
  model_cfg = cfg.model.replace(vocab_size=tokenizer.vocab_size)
  abstract_model = nnx.eval_shape(lambda: models.build(model_cfg))
  graphdef, abs_state = nnx.split(abstract_model)
  weights, s = restore_params(run_dir, nnx.to_pure_dict(abs_state), ema=ema, step=step)
  nnx.replace_by_pure_dict(abs_state, weights)
  return LoadedRun(nnx.merge(graphdef, abs_state), tokenizer, cfg, s, run_dir)
