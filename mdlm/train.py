"""The trainer: `python -m mdlm.train [hydra overrides]`, or `mdlm.train.run(cfg)`.

One pure, jitted train step per objective over a (data, fsdp, tensor) mesh with donated state;
grain data whose iterator state is checkpointed; orbax async checkpoints with exact resume; EMA
evaluation with the measures that apply to the objectives; metrics.jsonl + TensorBoard; a clean
stop on SIGTERM/SIGINT and on a non-finite loss or gradient. `train.phases` trains one model
under several objectives in turn (AntLM). Fine-tuning starts from another run's weights and
tokenizer with `train.init_from=<run_dir>` (mdlm.finetune).

Everything is checked before anything is compiled or written: the config, the resume policy, the
mesh against the devices, the fine-tuning source, then the data; a refused start leaves an
existing run directory exactly as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hydra.core.hydra_config import HydraConfig
from tensorboard.summary import Writer
from tqdm.auto import tqdm

from mdlm import checkpointing, cli, finetune, masking, models, objectives, rundir, sharding
from mdlm import config as config_lib
from mdlm import data as data_lib
from mdlm import measures as measures_lib
from mdlm.config import Config
from mdlm.evaluate import evaluate_batches, make_eval_step
from mdlm.models import presets
from mdlm.rundir import RunDir

log = logging.getLogger("mdlm.train")


class TrainingError(RuntimeError):
  """A run that cannot continue (non-finite loss, missing checkpoint on explicit resume, ...)."""


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(o: config_lib.OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then constant or cosine decay to final_lr_fraction * lr."""
  warmup = max(int(o.warmup_steps), 0)
  if o.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=o.lr * o.final_lr_fraction)
  if warmup == 0:
    return optax.constant_schedule(o.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])


def make_optimizer(o: config_lib.OptimConfig, total_steps: int) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: np.ndim(p) >= 2, params)
  # The clip stage is always present so the optimizer state has one structure whatever the
  # settings (a checkpoint stays loadable when only the clip value changes).
  parts = [optax.clip_by_global_norm(o.grad_clip if o.grad_clip > 0 else float("inf"))]
  mu_dtype = None if o.mu_dtype == "float32" else jnp.dtype(o.mu_dtype)  # None: the params'
  parts.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           mu_dtype=mu_dtype, weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def ema_decay_at(decay: float, step):
  """The EMA decay at optimizer step n (0-based): min(decay, (1 + n) / (10 + n)). The warm-up
  keeps the average from dwelling on the random initialisation in short runs."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


# ----------------------------------------------------------------------------- the model state


@dataclasses.dataclass
class ModelSpec:
  """Everything static about the model: its graph, a state template and parameter shardings."""

  graphdef: Any
  template: Any          # nnx.State of abstract parameters (copied before each merge)
  param_shardings: Any   # pure dict of NamedSharding
  cfg: Any
  initial_params: Any = None  # pure dict of given parameters (MARIA); None: fresh init from seed

  def merge(self, params):
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def abstract_params(self):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(self.template))


def model_spec(model_cfg, mesh, rules) -> ModelSpec:
  abstract = nnx.eval_shape(lambda: models.build(model_cfg))
  graphdef, state = nnx.split(abstract)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  shapes = nnx.to_pure_dict(state)
  return ModelSpec(graphdef, state, sharding.tree_shardings(logical, rules, mesh, shapes), model_cfg)


def given_spec(module, model_cfg, mesh, rules) -> ModelSpec:
  """A module that comes with its parameters (MARIA's head over its loaded backbones): its graph,
  shardings and those parameters; it trains without dropout."""
  graphdef, state = nnx.split(module)
  params = nnx.to_pure_dict(state)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return ModelSpec(graphdef, template, sharding.tree_shardings(logical, rules, mesh, params),
                   model_cfg.replace(dropout=0.0), initial_params=params)


def init_state(spec: ModelSpec, tx, seed: int, mesh, params=None, objective_state=None):
  """Initial train state, created directly with its shardings (no host-side full copy).

  params: starting parameters (a pure dict placed with spec.param_shardings, e.g. train.init_from)
  instead of spec.initial_params or a fresh init; they are donated (the caller drops them). The
  optimizer state, step and RNG are always fresh and the EMA starts at the parameters.
  objective_state: {objective name: its initial state} of stateful objectives."""

  init = functools.partial(_initial_state, spec, tx, seed, objective_state=objective_state)
  shardings = state_shardings(spec, tx, mesh, objective_state)
  if params is not None:  # donated: a fine-tune holds no third copy of the weights
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params), shardings
  return jax.jit(init, out_shardings=shardings)(spec.initial_params), shardings


def _initial_state(spec: ModelSpec, tx, seed: int, loaded, objective_state=None):
  params = (loaded if loaded is not None
            else nnx.to_pure_dict(nnx.state(models.build(spec.cfg, seed=seed))))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "ema": params, "rng": jax.random.key_data(jax.random.key(seed))}
  if objective_state:
    state["objective"] = objective_state
  return state


def abstract_state(spec: ModelSpec, tx, mesh, objective_state=None):
  """(the train state as ShapeDtypeStructs carrying their shardings, the shardings): what
  `init_state` would create, without allocating it (ahead-of-time compilation)."""
  shardings = state_shardings(spec, tx, mesh, objective_state)
  shapes = jax.eval_shape(lambda: _initial_state(spec, tx, 0, None, objective_state))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, shardings), shardings


def state_shardings(spec: ModelSpec, tx, mesh, objective_state=None):
  repl = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params())
  # MaskedNode: a parameter a masked / partitioned transformation holds no state for (MARIA).
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_opt,
                                 spec.param_shardings, transform_non_params=lambda _: repl,
                                 is_leaf=masked)
  out = {"step": repl, "params": spec.param_shardings, "opt_state": opt_sh,
         "ema": spec.param_shardings, "rng": repl}
  if objective_state:
    out["objective"] = jax.tree.map(lambda _: repl, objective_state)
  return out


# ----------------------------------------------------------------------------- steps


def make_train_step(spec: ModelSpec, tx, objective: objectives.Objective, ema_decay: float,
                    grad_accum: int, shardings, mesh, schedule: Optional[optax.Schedule] = None):
  """The jitted step of one objective: draw its corruption over the global batch, accumulate the
  micro-batch gradients of sum(nll_sum_B) / denominator, update, and carry the EMA (and the
  objective's state, if it has one)."""
  batch_sh = sharding.batch_sharding(mesh)
  use_dropout = spec.cfg.dropout > 0
  stateful = objective.stateful

  @sharding.activation_sharding(mesh)
  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    obj_state = state.get("objective", {}).get(objective.name)
    batch = dict(batch)
    batch_size = batch["tokens"].shape[0]
    batch.update(objective.draw(batch, key, state["step"], obj_state))
    # Normalise by the counted tokens of the whole global batch (the unit evaluation reports), so
    # accumulated micro-batch gradients sum to exactly the full-batch gradient.
    total_tokens = jnp.maximum(objective.denominator(batch), 1.0)

    def micro_loss(params, micro, micro_key):
      model = spec.merge(params)
      dropout_key = jax.random.fold_in(micro_key, 2) if use_dropout else None
      terms, aux = objective.loss(model, micro, micro_key, dropout_key=dropout_key)
      loss = jnp.sum(terms.nll_sum_B) / total_tokens
      # Only a stateful objective returns its per-row terms: the stateless step's graph (and so
      # its numerics) stays exactly what it was.
      return (loss, (terms, aux)) if stateful else loss

    grad_fn = jax.value_and_grad(micro_loss, has_aux=stateful)
    if grad_accum == 1:
      out, grads = grad_fn(state["params"], batch, jax.random.fold_in(key, 1))
    else:
      micro_batches = jax.tree.map(
          lambda x: x.reshape((grad_accum, batch_size // grad_accum) + x.shape[1:]), batch)

      def body(carry, inputs):
        i, micro = inputs
        out_i, grads_i = grad_fn(state["params"], micro, jax.random.fold_in(key, 100 + i))
        loss_i, rest = (out_i[0], out_i[1]) if stateful else (out_i, None)
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), rest

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
      (loss, grads), rest = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro_batches))
      merge_rows = lambda x: x.reshape((batch_size,) + x.shape[2:])
      out = (loss, jax.tree.map(merge_rows, rest)) if stateful else loss
    loss = out[0] if stateful else out
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if ema_decay > 0:
      # e + (1 - d)(p - e): a parameter that did not move (MARIA's frozen backbones) stays
      # bit-identical, which d e + (1 - d) p does not guarantee.
      decay = ema_decay_at(ema_decay, state["step"])
      ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state["ema"], params)
    else:
      ema = params
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema)
    if stateful:
      terms, aux = out[1]
      new_state["objective"] = dict(state["objective"], **{
          objective.name: objective.update_state(obj_state, batch, terms, aux)})
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": total_tokens,
               "lr": schedule(state["step"]) if schedule is not None else jnp.nan}
    return new_state, metrics

  # One batch sharding for every array of the batch (a pytree prefix): tokens, token_mask and,
  # with data.meap_sft, labels.
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


# ----------------------------------------------------------------------------- records


class MetricsLog:
  """metrics.jsonl (one JSON object per event) and TensorBoard scalars; process 0 only."""

  def __init__(self, run: RunDir, enabled: bool = True):
    self.enabled = enabled
    self.path = run.metrics_path
    self.tb = Writer(run.tb_dir) if enabled else None

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, float(v), step=int(record["step"]))
    self.tb.flush()

  def truncate_after(self, step: int) -> None:
    """On resume, drop events logged after the restored checkpoint (they will be re-logged)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(kept)

  def close(self):
    if self.tb is not None:
      self.tb.close()


class _StopFlag:
  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    self.signal = signum


def phase_at(step: int, tc: config_lib.TrainConfig) -> tuple[int, Optional[str]]:
  """(phase index, objective name) of the step with 0-based index `step`; (0, None) without
  train.phases."""
  if not tc.phases:
    return 0, None
  cycle = sum(p.steps for p in tc.phases)
  pos = step % cycle if tc.phase_cycle else min(step, cycle - 1)
  for i, phase in enumerate(tc.phases):
    if pos < phase.steps:
      return i, phase.objective
    pos -= phase.steps
  raise AssertionError("unreachable: pos < cycle")


# ----------------------------------------------------------------------------- preparation


def _check_resume_config(cfg: Config, run: RunDir) -> None:
  """Refuses to resume a run whose model, tokenizer or data layout differs from its checkpoints."""
  if not os.path.exists(run.config_path):
    return
  saved = run.load_config()
  diffs = []
  free = ("vocab_size", "dropout", "attention_impl", "name", "remat")  # change no parameter
  for section in ("model", "tokenizer"):
    a, b = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(cfg, section))
    diffs += [f"{section}.{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k not in free]
  if saved.data.seq_len != cfg.data.seq_len:
    diffs.append(f"data.seq_len: {saved.data.seq_len} -> {cfg.data.seq_len}")
  if diffs:
    raise TrainingError(
        f"{run.path} holds checkpoints of a different configuration ({'; '.join(diffs)}). Resume "
        "with the same settings, or choose a new run directory (hydra.run.dir=...). Nothing in "
        "it was changed.")


def _resume_policy(cfg: Config, run: RunDir) -> bool:
  """Whether this start resumes the run's own checkpoints (refusals change nothing)."""
  tc, has_ckpt = cfg.train, run.has_checkpoints()
  if tc.resume == "required" and not has_ckpt:
    raise TrainingError(
        f"train.resume=required but {run.checkpoints_dir} holds no checkpoint; check the run "
        "directory or use train.resume=auto to start fresh.")
  if tc.resume == "never" and has_ckpt:
    raise TrainingError(
        f"train.resume=never but {run.checkpoints_dir} already holds checkpoints; choose a new "
        "run directory (hydra.run.dir=...) or train.resume=auto. Nothing was deleted.")
  return has_ckpt and tc.resume != "never"


def make_mesh(cfg: Config, devices=None):
  """The device mesh and rules, checked against the devices (default: all of them) and the batch
  before any data work."""
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
  rules = sharding.rules_dict(cfg.mesh.rules)
  divisor = sharding.batch_divisor(mesh)
  if cfg.train.batch_size % divisor or cfg.train.batch_size % jax.process_count():
    raise ValueError(
        f"train.batch_size={cfg.train.batch_size} must be divisible by the data x fsdp mesh size "
        f"({divisor}) and the process count ({jax.process_count()}).")
  return mesh, rules


def recorded_tokenizer(cfg: Config, tokenizer) -> Config:
  """cfg with the tokenizer section describing the tokenizer actually used: prepared shards
  (data.source=arrayrecord) bring their own, whatever tokenizer.* says."""
  if cfg.data.source != "arrayrecord":
    return cfg
  return dataclasses.replace(cfg, tokenizer=dataclasses.replace(
      cfg.tokenizer, kind=tokenizer.kind, vocab_size=tokenizer.vocab_size, model_path=None))


def resolve_model_config(cfg: Config, tokenizer):
  model_cfg = cfg.model
  if model_cfg.vocab_size and model_cfg.vocab_size != tokenizer.vocab_size:
    raise ValueError(
        f"model.vocab_size={model_cfg.vocab_size} differs from the tokenizer's "
        f"{tokenizer.vocab_size}; leave model.vocab_size=0 to take it from the tokenizer.")
  return model_cfg.replace(vocab_size=tokenizer.vocab_size)


@dataclasses.dataclass
class Prepared:
  """A checked start: everything the loop needs, nothing compiled yet."""

  cfg: Config
  run: RunDir
  resuming: bool
  mesh: Any
  spec: ModelSpec
  tx: Any
  tokenizer: Any
  objectives: dict        # name -> Objective
  setup: Any
  train_ds: Any
  val_ds: Any
  source: Any = None      # finetune.Source (train.init_from)
  init_params: Any = None


def _tokenizer(cfg: Config, run: RunDir, given, source):
  """The run's tokenizer: the run's own (resume), the fine-tune source's, the given model's
  (MARIA), or built from the config (read-only until the caller saves it)."""
  if run.has_tokenizer():
    return data_lib.load_tokenizer(run.tokenizer_dir)
  if given is not None:
    return given[1]
  if source is not None:
    return source.tokenizer
  return data_lib.build_tokenizer(cfg.tokenizer, cfg.data, cfg.data.cache_dir or
                                  run.data_cache_dir)


def _token_classes(cfg: Config, tokenizer, cache_dir: str):
  """masking.content=weighted: each token id's class (a user file, or frequency buckets of the
  training split)."""
  if not any(objectives.get(s.name).needs_token_classes(s, cfg)
             for s in objectives.run_objectives(cfg)):
    return None
  if cfg.masking.classes_path:
    return masking.load_classes(cfg.masking.classes_path, tokenizer.vocab_size)
  counts = data_lib.token_counts(cfg.data, tokenizer, "train", cache_dir)
  return masking.frequency_classes(counts, cfg.masking.num_classes)


def _given_model(cfg: Config):
  """(module, tokenizer) of an objective that trains over trained runs (MARIA), else None."""
  objective = objectives.get(cfg.objective.name)
  runs = objective.given_runs(cfg.objective)
  if not runs:
    return None
  return objective.given_model(cfg.objective, {role: rundir.load_run(path)
                                               for role, path in runs.items()})


def prepare(cfg: Config, run: RunDir, overrides: tuple = ()) -> Prepared:
  """Checks and loads everything a start needs; writes only once every check has passed
  (`overrides`: the command line of this start, appended to the run's overrides.yaml)."""
  tc = cfg.train
  resuming = _resume_policy(cfg, run)
  mesh, rules = make_mesh(cfg)
  source = None  # train.init_from: the run whose weights and tokenizer this one starts from
  if tc.init_from and resuming:
    log.info("train.init_from=%s is ignored: %s holds this run's own checkpoints; resuming from "
             "them.", tc.init_from, run.checkpoints_dir)
  elif tc.init_from:
    source = finetune.resolve(tc)
    finetune.check_tokenizer(cfg, source)
  given = _given_model(cfg)
  tokenizer = _tokenizer(cfg, run, given, source)
  cfg = recorded_tokenizer(cfg, tokenizer)
  if resuming:
    _check_resume_config(cfg, run)
  model_cfg = resolve_model_config(cfg, tokenizer)
  if source is not None:
    finetune.check_model(model_cfg, source)
  spec = model_spec(model_cfg, mesh, rules)
  if given is not None:
    if cfg.data.seq_len > given[0].max_seq_len:
      raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the given model's max_seq_len="
                       f"{given[0].max_seq_len}; use the data settings it was trained with.")
    spec = given_spec(given[0], model_cfg, mesh, rules)
  init_params = None
  if source is not None:  # read now, so an unreadable checkpoint is refused before any write
    init_params = finetune.load_params(source, spec.abstract_params(), spec.param_shardings)
  cache_dir = cfg.data.cache_dir or run.data_cache_dir
  data_kw = dict(batch_size=tc.batch_size, seed=tc.seed, process_index=jax.process_index(),
                 process_count=jax.process_count(), cache_dir=cache_dir)
  train_ds = data_lib.build_dataset(cfg.data, tokenizer, split="train", **data_kw)
  val_ds = data_lib.build_dataset(cfg.data, tokenizer, split="val", shuffle=False, num_epochs=1,
                                  **data_kw)
  setup = objectives.make_setup(cfg, model_cfg.vocab_size, tokenizer,
                                _token_classes(cfg, tokenizer, cache_dir))
  objs = {s.name: objectives.build(s, setup) for s in objectives.run_objectives(cfg)}
  tx = make_optimizer(cfg.optim, tc.steps)
  if given is not None:
    tx = objectives.get(cfg.objective.name).wrap_optimizer(tx, spec.initial_params)
  _write_start(cfg, run, tokenizer, model_cfg, source, overrides)
  return Prepared(cfg, run, resuming, mesh, spec, tx, tokenizer, objs, setup, train_ds, val_ds,
                  source, init_params)


def _write_start(cfg: Config, run: RunDir, tokenizer, model_cfg, source, overrides) -> None:
  """The writes of a start that passed every check: tokenizer, config.yaml, the command line,
  provenance."""
  if jax.process_index() != 0:
    return
  os.makedirs(run.path, exist_ok=True)
  if source is not None:
    finetune.copy_tokenizer(source, run.path)
  elif not run.has_tokenizer():
    tokenizer.save(run.tokenizer_dir)
  resolved = dataclasses.replace(cfg, model=model_cfg.replace(vocab_size=0)
                                 if cfg.model.vocab_size == 0 else model_cfg, run_dir=run.path)
  run.write_config(resolved)
  if overrides:
    run.write_overrides(list(overrides))
  if source is not None:
    finetune.write_provenance(source, run.path)


# ----------------------------------------------------------------------------- the loop


class Trainer:
  """The loop over one prepared start: restore, step, log, evaluate, checkpoint, stop."""

  def __init__(self, p: Prepared):
    self.p, self.cfg, self.tc = p, p.cfg, p.cfg.train
    self.is_main = jax.process_index() == 0
    objective_state = {n: o.init_state() for n, o in p.objectives.items() if o.stateful}
    self.state, self.shardings = init_state(p.spec, p.tx, self.tc.seed, p.mesh, p.init_params,
                                            objective_state)
    p.init_params = None
    if p.source is not None:
      log.info("Initialised from the %s weights of %s (step %d); fresh optimizer state, EMA, "
               "step counter and data order.", "EMA" if p.source.ema else "raw",
               p.source.run_dir, p.source.step)
    self.mgr = checkpointing.manager(p.run.checkpoints_dir, keep=self.tc.keep_checkpoints)
    self.train_iter = iter(p.train_ds)
    self.metrics_log = MetricsLog(p.run, enabled=self.is_main)
    self.last_loss, self.last_val, self.last_saved = None, None, None
    self.step = self._restore() if p.resuming else 0
    schedule = lr_schedule(self.cfg.optim, self.tc.steps)
    self.steps = {n: make_train_step(p.spec, p.tx, o, self.cfg.optim.ema, self.cfg.optim.grad_accum,
                                     self.shardings, p.mesh, schedule)
                  for n, o in p.objectives.items()}
    self.measures = list(dict.fromkeys(type(o).measures[0] for o in p.objectives.values()))
    self.eval_steps = {m: make_eval_step(p.spec.merge, measures_lib.get(m), p.setup,
                                         self.tc.eval_time_samples, p.mesh, p.spec.param_shardings)
                       for m in self.measures}
    seq_len = self.cfg.data.seq_len
    self.tokens_per_step = self.tc.batch_size * seq_len
    self.flops_per_token = presets.flops_per_token(p.spec.cfg, seq_len)["full"]
    self.tokens_seen = self.step * self.tokens_per_step
    self.pending: list = []  # (step, device metrics) not yet checked

  def _restore(self) -> int:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.state, self.shardings)
    restored = checkpointing.restore_latest(self.mgr, abstract, self.train_iter,
                                            unreadable_dir=self.p.run.unreadable_dir)
    if restored is None:
      if self.tc.resume == "required":
        raise TrainingError(f"No readable checkpoint in {self.p.run.checkpoints_dir} "
                            "(train.resume=required).")
      if self.tc.init_from:  # the state is a fresh init, not the source's weights
        raise TrainingError(
            f"No readable checkpoint in {self.p.run.checkpoints_dir} (the unreadable ones were "
            "moved to checkpoints_unreadable/); run again to start afresh from "
            f"train.init_from={self.tc.init_from}.")
      return 0
    step, self.state, _ = restored
    self.last_saved = step
    self.metrics_log.truncate_after(step)
    log.info("Resumed from step %d of %s", step, self.p.run.checkpoints_dir)
    return step

  def objective_at(self, step: int) -> tuple[int, str]:
    phase, name = phase_at(step, self.tc)
    return phase, name or self.cfg.objective.name

  # ----------------------------------------------------------------------------- events

  def check_pending(self) -> Optional[dict]:
    """Checks the loss and gradient of every pending step; raises on the first non-finite one."""
    if not self.pending:
      return None
    values = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for s, m in zip(steps, values):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        kept = (f"the last checkpoint (step {self.last_saved}) in {self.p.run.checkpoints_dir} "
                "is kept" if self.last_saved is not None else "no checkpoint was written")
        self.step = s
        raise TrainingError(
            f"Non-finite training {'loss' if not np.isfinite(m['loss']) else 'gradient'} "
            f"(loss {m['loss']}, gradient norm {m['grad_norm']}) at step {s}. Stopping; {kept}. "
            "Lower optim.lr, check the data, or raise noise.t_min.")
    self.last_loss = {k: float(v) for k, v in values[-1].items()}
    return self.last_loss

  def save(self, metrics: Optional[dict] = None) -> None:
    self.check_pending()  # never checkpoint a state that followed a non-finite loss
    phase, name = self.objective_at(max(self.step - 1, 0))
    meta = {"step": self.step, "objective": name, "phase": phase, "tokens": self.tokens_seen}
    checkpointing.save(self.mgr, self.step, self.state, self.train_iter, meta, metrics)
    self.last_saved = self.step

  def evaluate(self) -> dict:
    key = jax.random.fold_in(jax.random.key(self.tc.seed), 2 ** 30)
    local_batch = self.tc.batch_size // jax.process_count()
    record = {"step": self.step}
    for i, m in enumerate(self.measures):
      try:
        ev = evaluate_batches(self.eval_steps[m], self.state["ema"], self.p.val_ds, self.p.mesh,
                              local_batch, key, self.tc.eval_batches)
      except ValueError as e:
        raise TrainingError(str(e)) from e
      if i == 0:
        record.update({"val/nll": ev["nll"], "val/nll_stderr": ev["nll_stderr"],
                       "val/ppl": ev["ppl"], "val/bpt": ev["bpt"]})
      if len(self.measures) > 1:
        record.update({f"val/{m}": ev["nll"], f"val/{m}_stderr": ev["nll_stderr"]})
    return record

  def log_train(self, interval_start: float, interval_tokens: int) -> float:
    """Logs the last step's metrics and the throughput since interval_start; returns the time
    the interval ended (after the pending steps finished, so the rate is the device's)."""
    last = self.check_pending()
    now = time.time()
    tps = interval_tokens / max(now - interval_start, 1e-9)
    record = {"step": self.step, "tokens": self.tokens_seen, "wall_time": time.time() - self.t0,
              "train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
              "train/lr": last["lr"], "train/tokens_per_s": tps,
              "train/model_flops_per_s": self.flops_per_token * tps}
    if self.tc.phases:
      record["phase"], record["objective"] = self.objective_at(self.step - 1)
    self.metrics_log.write(record)
    self.write_status("running")
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
    return now

  def write_status(self, state: str, message: str = "") -> None:
    if not self.is_main:
      return
    fields = {"state": state, "step": self.step, "steps": self.tc.steps,
              "tokens": self.tokens_seen, "wall_time": time.time() - self.t0,
              "checkpoint": self.last_saved, "message": message}
    if self.last_loss is not None:
      fields["train/loss"] = self.last_loss["loss"]
    if self.last_val is not None:
      fields["val/nll"] = self.last_val["val/nll"]
    self.p.run.write_status(**fields)

  # ----------------------------------------------------------------------------- the run

  def run(self) -> str:
    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    self.t0 = time.time()
    self.bar = (tqdm(total=self.tc.steps, initial=self.step, desc="train", dynamic_ncols=True,
                     file=sys.stderr) if self.is_main and self.tc.progress else None)
    self.write_status("running")
    status, message = "finished", ""
    try:
      status, message = self._loop(stop)
      self.check_pending()
    except TrainingError as e:
      status, message = "failed", str(e)
      raise
    except BaseException as e:
      status, message = "failed", f"{type(e).__name__}: {e}"
      raise
    finally:
      try:
        self.mgr.wait_until_finished()
        self.mgr.close()
      finally:
        for s, h in old_handlers.items():
          signal.signal(s, h)
        if self.bar is not None:
          self.bar.close()
        self.metrics_log.close()
        self.write_status(status, message)
    if message:
      log.warning(message)
    return self.p.run.path

  def _loop(self, stop: _StopFlag) -> tuple[str, str]:
    tc = self.tc
    interval_start, interval_tokens = time.time(), 0
    while self.step < tc.steps:
      batch = sharding.global_batch(next(self.train_iter), self.p.mesh)
      _, name = self.objective_at(self.step)
      self.state, metrics = self.steps[name](self.state, batch)
      self.step += 1
      self.tokens_seen += self.tokens_per_step
      interval_tokens += self.tokens_per_step
      self.pending.append((self.step, metrics))
      if self.step % tc.log_every == 0 or self.step == tc.steps:
        interval_start, interval_tokens = self.log_train(interval_start, interval_tokens), 0
      ckpt_metrics = None
      if self.step % tc.eval_every == 0 or self.step == tc.steps:
        self.check_pending()
        self.last_val = self.evaluate()
        self.last_val.update(tokens=self.tokens_seen, wall_time=time.time() - self.t0)
        self.metrics_log.write(self.last_val)
        ckpt_metrics = {checkpointing.BEST_METRIC: self.last_val["val/nll"]}
        if self.bar is not None:
          v = self.last_val
          self.bar.write(f"step {self.step}: val nll {v['val/nll']:.4f} ± "
                         f"{v['val/nll_stderr']:.4f}, ppl {v['val/ppl']:.2f}, bits/token "
                         f"{v['val/bpt']:.3f}")
      if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or ckpt_metrics:
        self.save(ckpt_metrics)
      if self.bar is not None:
        self.bar.update(1)
      if stop.signal is not None:
        self.save()
        return "interrupted", (f"stopped by signal {signal.Signals(stop.signal).name} at step "
                               f"{self.step}")
      if tc.max_wall_minutes and time.time() - self.t0 > 60 * tc.max_wall_minutes:
        self.save()
        return "interrupted", f"train.max_wall_minutes reached at step {self.step}"
    return "finished", ""


def run(cfg: Config, run_dir: Optional[str] = None, overrides: tuple = ()) -> str:
  """Trains according to `cfg` in `run_dir` (resuming automatically); returns the run dir.
  `overrides`: the command line that asked for it, recorded in the run directory."""
  cfg = config_lib.validate(cfg)
  sharding.maybe_initialize_distributed()
  run = RunDir(run_dir or cfg.run_dir or os.path.join("runs", "default"))
  # Shardings are explicit in every jit (in/out shardings from the mesh rules): no ambient mesh.
  return Trainer(prepare(cfg, run, overrides)).run()


# ----------------------------------------------------------------------------- CLI


def _next_steps(run_dir: str) -> str:
  rel = os.path.relpath(run_dir)
  return (f"  evaluate:    python -m mdlm.evaluate run={rel}\n"
          f"  sample:      python -m mdlm.sample run={rel}\n"
          f"  TensorBoard: tensorboard --logdir {os.path.join(rel, 'tb')}")


def _hydra_main():
  config_lib.register_configs()
  cli.register_help_resolver()

  @hydra.main(version_base=None, config_path=_config_path(), config_name="config")
  def main(hydra_cfg) -> Optional[float]:
    cli.setup_logging()
    try:
      cfg = config_lib.to_config(hydra_cfg)
    except Exception as e:
      raise SystemExit(f"mdlm.train: invalid config: {e}")
    run_dir = RunDir(cfg.run_dir or HydraConfig.get().runtime.output_dir).path
    print(f"mdlm.train: run directory {run_dir}", file=sys.stderr)
    try:
      run(cfg, run_dir, tuple(HydraConfig.get().overrides.task))
    except (TrainingError, ValueError, FileNotFoundError) as e:
      raise SystemExit(f"mdlm.train: {e}")
    status = RunDir(run_dir).read_status() or {}
    print(f"mdlm.train: {status.get('state', 'stopped')} at step {status.get('step')}; run "
          f"directory {run_dir}\n{_next_steps(run_dir)}", file=sys.stderr)
    return status.get("val/nll")

  main()


def _config_path() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


if __name__ == "__main__":
  _hydra_main()
