"""Checkpoint I/O with orbax: one checkpoint per step under a checkpoints directory.

A checkpoint holds the train state (parameters, optimizer state, EMA, step, RNG key and any
objective state), the data iterator's state (grain's own orbax handler: one file per process) and
a small metadata record. Saves are asynchronous; the manager keeps the last K checkpoints plus
the best one by validation loss. Restoring walks back from the newest step when a checkpoint is
unreadable, moving it aside, so a corrupt or partial latest save never blocks resume. This module
knows orbax and nothing of the run directory around it (mdlm.rundir).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import absl.logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

log = logging.getLogger(__name__)
BEST_METRIC = "val_nll"
ITEMS = ("state", "data", "meta")


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
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save(mgr: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict,
         metrics: Optional[dict] = None) -> bool:
  """Saves step `step` unless it is already saved (a stop right after a scheduled checkpoint);
  returns whether a new save was started."""
  if step in mgr.all_steps():
    return False
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
  return True


def save_imported(directory: str, state, meta: dict) -> None:
  """Writes step 0 of imported weights (mdlm.convert) synchronously: the trainer's state layout
  (params, EMA, optimizer state, step, RNG) and `meta`, which carries IMPORTED; no data-iterator
  state, as the weights never saw this codebase's data."""
  mgr = manager(directory, keep=1, async_save=False)
  try:
    mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)), force=True)
    mgr.wait_until_finished()
  finally:
    mgr.close()


IMPORTED = "imported_from"  # the meta key of a checkpoint written by save_imported


def _refuse_imported(mgr: ocp.CheckpointManager, step: int) -> None:
  """An imported checkpoint (no data item) is refused as a resume point instead of being taken
  for a corrupt one and moved aside."""
  if os.path.isdir(os.path.join(str(mgr.directory), str(step), "data")):
    return
  try:
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # unreadable: the caller's own handling applies
    return
  if isinstance(meta, dict) and meta.get(IMPORTED):
    run_dir = os.path.dirname(os.path.abspath(str(mgr.directory)))
    raise CheckpointError(
        f"Checkpoint step {step} in {mgr.directory} holds weights imported from "
        f"{meta[IMPORTED]} (mdlm.convert), not a training run to resume. Fine-tune from it in a "
        f"new run directory: python -m mdlm.train train.init_from={run_dir} "
        "hydra.run.dir=<new dir> (with its model settings).")


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, data_iterator, *,
                   unreadable_dir: str, step: Optional[int] = None):
  """Returns (step, state, meta) from the newest readable checkpoint (the data iterator is
  restored in place), or None when there is none. An unreadable checkpoint is moved into
  `unreadable_dir` (never deleted) and the previous one is tried.

  With `step`, restores exactly that step (and raises if it is unreadable).
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {mgr.directory}; have {steps}.")
    steps = [step]
  for s in steps:
    _refuse_imported(mgr, s)
    try:
      out = mgr.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator), meta=ocp.args.JsonRestore()))
      return s, out["state"], out["meta"]
    except Exception as e:  # a truncated or corrupt save: fall back to the previous one
      if _is_mismatch(e):
        raise CheckpointError(
            f"Checkpoint step {s} in {mgr.directory} does not match the current model/optimizer "
            f"configuration ({str(e)[:300]}). Resume with the run's own config.yaml, or start a "
            "new run directory.") from e
      if step is not None:
        raise CheckpointError(f"Checkpoint step {s} in {mgr.directory} is unreadable: {e}") from e
      quarantine = _quarantine(mgr, s, unreadable_dir)
      log.warning("Checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and fell back "
                  "to the previous one.", s, mgr.directory, type(e).__name__, str(e)[:200],
                  quarantine)
  return None


def _is_mismatch(e: Exception) -> bool:
  text = str(e)
  return isinstance(e, ValueError) and ("tree structures do not match" in text or
                                        "not compatible with the stored shape" in text)


def _quarantine(mgr: ocp.CheckpointManager, step: int, unreadable_dir: str) -> str:
  """Moves an unreadable step aside (never deletes it) so training can write that step again."""
  src = os.path.join(str(mgr.directory), str(step))
  os.makedirs(unreadable_dir, exist_ok=True)
  dst = os.path.join(unreadable_dir, f"{step}-{int(time.time())}")
  shutil.move(src, dst)
  mgr.reload()
  return dst


def _read_only_manager(ckpt_dir: str) -> ocp.CheckpointManager:
  """A manager that only reads (the source of a fine-tune, a run being evaluated). orbax warns
  "Given directory is read only" through absl on creating one: expected here, so muted."""
  level = absl.logging.get_verbosity()
  absl.logging.set_verbosity(absl.logging.ERROR)
  try:
    return manager(ckpt_dir, read_only=True, async_save=False)
  finally:
    absl.logging.set_verbosity(level)


def _open_checkpoints(ckpt_dir: str) -> tuple[ocp.CheckpointManager, list[int]]:
  """A read-only manager of a checkpoints directory and its steps, oldest first (the caller
  closes the manager); FileNotFoundError when there is none."""
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{os.path.dirname(ckpt_dir)} has no checkpoints/ directory; train "
                            "it first.")
  mgr = _read_only_manager(ckpt_dir)
  steps = sorted(mgr.all_steps())
  if not steps:
    mgr.close()
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint.")
  return mgr, steps


def checkpoint_steps(ckpt_dir: str) -> list[int]:
  """The saved steps, oldest first; FileNotFoundError when there is none."""
  mgr, steps = _open_checkpoints(ckpt_dir)
  mgr.close()
  return steps


def restore_params(ckpt_dir: str, params_abs, *, ema: bool = True, step: Optional[int] = None,
                   shardings=None) -> tuple[Any, int]:
  """(parameters, step) of one checkpoint: the EMA (or raw) weights as a pure dict.

  params_abs: pure dict of jax.ShapeDtypeStruct (the model's abstract parameters). shardings: a
  matching pure dict of shardings to restore straight into (default: all on the first device).
  step None: the newest readable checkpoint, older ones tried (one warning line each, naming the
  step used); an explicit step is restored exactly or raises CheckpointError. Read-only.
  """
  key = "ema" if ema else "params"
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, params_abs)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
  mgr, steps = _open_checkpoints(ckpt_dir)
  skipped = []
  try:
    if step is not None and step not in steps:
      raise CheckpointError(f"{ckpt_dir} has no step {step}; it has {steps}.")
    for s in (sorted(steps, reverse=True) if step is None else [step]):
      try:
        item = _restore_quietly(mgr, s, key, params_abs, restore_args)
      except Exception as e:
        if step is not None:
          raise CheckpointError(f"Checkpoint step {s} in {ckpt_dir} is unreadable "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e
        skipped.append((s, e))
        continue
      if skipped:
        log.warning("Using checkpoint step %d of %s: %s", s, ckpt_dir, "; ".join(
            f"step {k} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            for k, e in skipped))
      return item["state"][key], int(s)
  finally:
    mgr.close()
  raise CheckpointError(f"No readable checkpoint in {ckpt_dir}: " + "; ".join(
      f"step {k}: {type(e).__name__}: {str(e).splitlines()[0][:120]}" for k, e in skipped))


def _restore_quietly(mgr, step, key, params_abs, restore_args):
  """Partial restore of one parameter tree (no optimizer state), with TensorStore's and absl's
  multi-line warnings about unreadable files muted: the caller reports in one line."""
  level = absl.logging.get_verbosity()
  absl.logging.set_verbosity(absl.logging.FATAL)
  try:
    return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={key: params_abs}, restore_args={key: restore_args}, partial_restore=True)))
  finally:
    absl.logging.set_verbosity(level)
