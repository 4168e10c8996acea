"""The trainer: `python -m mdlm.train [hydra overrides]`, or `mdlm.train.run(cfg)`.

One pure, jitted train step over a (data, fsdp, tensor) mesh with donated state; grain data whose
iterator state is checkpointed; orbax async checkpoints with exact resume; EMA evaluation;
metrics.jsonl + TensorBoard; clean stop on SIGTERM/SIGINT and on a non-finite loss. Fine-tuning
starts from another run's weights and tokenizer with `train.init_from=<run_dir>` (mdlm.finetune).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdlm import checkpointing, diffusion, finetune, objectives, perf, sharding
from mdlm.evaluate import evaluate_batches, make_eval_step
from mdlm import config as config_lib
from mdlm import models
from mdlm.config import Config
from mdlm.models import presets

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
  parts.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- the model state


@dataclasses.dataclass
class ModelSpec:
  """Everything static about the model: its graph, a state template and parameter shardings."""

  graphdef: Any
  template: Any          # nnx.State of abstract parameters (copied before each merge)
  param_shardings: Any   # pure dict of NamedSharding
  cfg: Any
  initial_params: Any = None  # pure dict of loaded parameters (MARIA); None: fresh init from seed

  def merge(self, params):
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def model_spec(model_cfg, mesh, rules) -> ModelSpec:
  abstract = nnx.eval_shape(lambda: models.build(model_cfg))
  graphdef, state = nnx.split(abstract)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  shapes = nnx.to_pure_dict(state)
  return ModelSpec(graphdef, state, sharding.tree_shardings(logical, rules, mesh, shapes), model_cfg)


def maria_spec(head, model_cfg, mesh, rules, seq_len: int) -> ModelSpec:
  """objective=maria: the head's graph and shardings; its parameters are the loaded backbones and
  W (only W trains: see hybrid.freeze_backbones)."""
  if seq_len > head.max_seq_len:
    raise ValueError(f"data.seq_len={seq_len} exceeds the MARIA backbones' max_seq_len="
                     f"{head.max_seq_len}; use the data settings of the backbone runs.")
  graphdef, state = nnx.split(head)
  params = nnx.to_pure_dict(state)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return ModelSpec(graphdef, template, sharding.tree_shardings(logical, rules, mesh, params),
                   model_cfg.replace(dropout=0.0), initial_params=params)


def init_state(spec: ModelSpec, tx, seed: int, mesh, params=None):
  """Initial train state, created directly with its shardings (no host-side full copy).

  params: starting parameters (a pure dict placed with spec.param_shardings, e.g. train.init_from)
  instead of spec.initial_params or a fresh init; they are donated (the caller drops them). The
  optimizer state, step and RNG are always fresh and the EMA starts at the parameters."""

  def init(loaded):
    params = (loaded if loaded is not None
              else nnx.to_pure_dict(nnx.state(models.build(spec.cfg, seed=seed))))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema": params, "rng": jax.random.key_data(jax.random.key(seed))}

  shardings = state_shardings(spec, tx, mesh)
  if params is not None:  # donated: a fine-tune holds no third copy of the weights
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params), shardings
  return jax.jit(init, out_shardings=shardings)(spec.initial_params), shardings


def state_shardings(spec: ModelSpec, tx, mesh):
  repl = sharding.replicated(mesh)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 nnx.to_pure_dict(spec.template))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # MaskedNode: a parameter a masked / partitioned transformation holds no state for (MARIA).
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_opt,
                                 spec.param_shardings, transform_non_params=lambda _: repl,
                                 is_leaf=masked)
  return {"step": repl, "params": spec.param_shardings, "opt_state": opt_sh,
          "ema": spec.param_shardings, "rng": repl}


# ----------------------------------------------------------------------------- steps


def make_train_step(spec: ModelSpec, tx, ctx: objectives.Context, objective: str, ema_decay: float,
                    grad_accum: int, shardings, mesh, schedule: Optional[optax.Schedule] = None):
  objective_fn = objectives.get(objective)
  batch_sh = sharding.batch_sharding(mesh)
  use_dropout = spec.cfg.dropout > 0

  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    batch = dict(batch)
    batch_size = batch["tokens"].shape[0]
    if objective == "diffusion":  # times and masks drawn over the *global* batch
      batch.update(objectives.corrupt_batch(batch, jax.random.fold_in(key, 0), ctx))
    elif objective == "maria":  # likewise, so the masked-token count is known up front
      batch.update(objectives.maria_corrupt_batch(batch, jax.random.fold_in(key, 0), ctx))
    # Normalise by the counted tokens of the whole global batch (the unit evaluation reports:
    # per masked token for maria, per label for MEAP-SFT), so accumulated micro-batch gradients
    # sum to exactly the full-batch gradient.
    total_tokens = jnp.maximum(objectives.loss_denominator(objective, batch, ctx), 1.0)

    def micro_loss(params, micro, micro_key):
      model = spec.merge(params)
      dropout_key = jax.random.fold_in(micro_key, 2) if use_dropout else None
      terms = objective_fn(model, micro, micro_key, ctx, dropout_key=dropout_key)
      return jnp.sum(terms.nll_sum_B) / total_tokens

    grad_fn = jax.value_and_grad(micro_loss)
    if grad_accum == 1:
      loss, grads = grad_fn(state["params"], batch, jax.random.fold_in(key, 1))
    else:
      micro_batches = jax.tree.map(
          lambda x: x.reshape((grad_accum, batch_size // grad_accum) + x.shape[1:]), batch)

      def body(carry, inputs):
        i, micro = inputs
        loss_i, grads_i = grad_fn(state["params"], micro, jax.random.fold_in(key, 100 + i))
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro_batches))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if ema_decay > 0:
      # e + (1 - d)(p - e): a parameter that did not move (MARIA's frozen backbones) stays
      # bit-identical, which d e + (1 - d) p does not guarantee.
      ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state["ema"], params)
    else:
      ema = params
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema,
                 "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": total_tokens,
               "lr": schedule(state["step"]) if schedule is not None else jnp.nan}
    return new_state, metrics

  # One batch sharding for every array of the batch (a pytree prefix): tokens, token_mask and,
  # with data.meap_sft, labels.
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


# ----------------------------------------------------------------------------- logging


class MetricsLog:
  """metrics.jsonl (one JSON object per event) and TensorBoard scalars; process 0 only."""

  def __init__(self, run_dir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.tb = None
    if enabled:
      from tensorboard.summary import Writer
      self.tb = Writer(os.path.join(run_dir, "tb"))

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


def write_status(run_dir: str, **fields) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(run_dir, "status.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(fields, f, indent=1)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run


def encode_iterator_state(state: Any) -> dict:
  """grain iterator state -> JSON (bytes become base64 strings, tagged)."""
  import base64

  def enc(x):
    if isinstance(x, bytes):
      return {"__bytes__": base64.b64encode(x).decode()}
    if isinstance(x, dict):
      return {k: enc(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [enc(v) for v in x]
    if isinstance(x, np.generic):
      return x.item()
    return x

  return {"iterator": enc(state)}


def decode_iterator_state(payload: dict) -> Any:
  import base64

  def dec(x):
    if isinstance(x, dict):
      if set(x) == {"__bytes__"}:
        return base64.b64decode(x["__bytes__"])
      return {k: dec(v) for k, v in x.items()}
    if isinstance(x, list):
      return [dec(v) for v in x]
    return x

  return dec(payload["iterator"])


class _StopFlag:
  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    self.signal = signum


def _check_resume_config(cfg: Config, run_dir: str) -> None:
  """Refuses to resume a run whose model, tokenizer or data layout differs from its checkpoints."""
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.exists(path):
    return
  saved = checkpointing.load_config(run_dir)
  diffs = []
  for section in ("model", "tokenizer"):
    a, b = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(cfg, section))
    diffs += [f"{section}.{k}: {a[k]!r} -> {b[k]!r}" for k in a
              if a[k] != b[k] and k not in ("vocab_size", "dropout", "attention_impl", "name")]
  if saved.data.seq_len != cfg.data.seq_len:
    diffs.append(f"data.seq_len: {saved.data.seq_len} -> {cfg.data.seq_len}")
  if diffs:
    raise TrainingError(
        f"{run_dir} holds checkpoints of a different configuration ({'; '.join(diffs)}). Resume "
        "with the same settings, or choose a new run directory (hydra.run.dir=...).")


def setup_data(cfg: Config, run_dir: str, tokenizer=None):
  from mdlm import data as data_lib
  cache_dir = cfg.data.cache_dir or os.path.join(run_dir, "data_cache")
  tok_dir = os.path.join(run_dir, "tokenizer")
  if tokenizer is None:
    if os.path.exists(tok_dir) and os.listdir(tok_dir):
      tokenizer = data_lib.load_tokenizer(tok_dir)
    else:
      tokenizer = data_lib.build_tokenizer(cfg.tokenizer, cfg.data, cache_dir)
      if jax.process_index() == 0:
        tokenizer.save(tok_dir)
  return tokenizer, cache_dir


def resolve_model_config(cfg: Config, tokenizer):
  model_cfg = cfg.model
  if model_cfg.vocab_size and model_cfg.vocab_size != tokenizer.vocab_size:
    raise ValueError(
        f"model.vocab_size={model_cfg.vocab_size} differs from the tokenizer's "
        f"{tokenizer.vocab_size}; leave model.vocab_size=0 to take it from the tokenizer.")
  return model_cfg.replace(vocab_size=tokenizer.vocab_size)


def run(cfg: Config, run_dir: Optional[str] = None) -> str:
  """Trains according to `cfg` in `run_dir` (resuming automatically); returns the run dir."""
  from omegaconf import OmegaConf
  from mdlm import data as data_lib

  config_lib.validate(cfg)
  run_dir = os.path.abspath(run_dir or cfg.run_dir or os.path.join("runs", "default"))
  os.makedirs(run_dir, exist_ok=True)
  sharding.maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  tc, objective = cfg.train, config_lib.objective(cfg)
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  has_ckpt = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  if tc.resume == "required" and not has_ckpt:
    raise TrainingError(
        f"train.resume=required but {ckpt_dir} holds no checkpoint; check the run directory or "
        "use train.resume=auto to start fresh.")
  if tc.resume == "never" and has_ckpt:
    raise TrainingError(
        f"train.resume=never but {ckpt_dir} already holds checkpoints; choose a new run "
        "directory (hydra.run.dir=...) or train.resume=auto. Nothing was deleted.")

  resuming = has_ckpt and tc.resume != "never"
  if resuming:
    _check_resume_config(cfg, run_dir)

  # --- data and model configuration: everything is checked before anything compiles.
  source = None  # train.init_from: the run whose weights and tokenizer this one starts from
  if tc.init_from and resuming:
    # init_from is for the first start only: an interrupted fine-tune continues exactly.
    log.info("train.init_from=%s is ignored: %s holds this run's own checkpoints; resuming from "
             "them.", tc.init_from, ckpt_dir)
  elif tc.init_from:
    source = finetune.resolve(tc)
    finetune.check_tokenizer(cfg, source)
    finetune.check_model(resolve_model_config(cfg, source.tokenizer), source)
  maria_head = None
  if objective == "maria":  # a trained head over two existing runs (mdlm.models.hybrid)
    from mdlm.models import hybrid
    maria_head, run_tokenizer = hybrid.load_maria(tc.maria_denoiser_run, tc.maria_ar_run)
    if is_main and not os.path.isdir(os.path.join(run_dir, "tokenizer")):
      run_tokenizer.save(os.path.join(run_dir, "tokenizer"))
  tokenizer, cache_dir = setup_data(cfg, run_dir, source.tokenizer if source else None)
  model_cfg = resolve_model_config(cfg, tokenizer)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rules = sharding.rules_dict(cfg.mesh.rules)
  divisor = sharding.batch_divisor(mesh)
  if tc.batch_size % divisor or tc.batch_size % jax.process_count():
    raise ValueError(
        f"train.batch_size={tc.batch_size} must be divisible by the data x fsdp mesh size "
        f"({divisor}) and the process count ({jax.process_count()}).")
  local_batch = tc.batch_size // jax.process_count()
  spec = model_spec(model_cfg, mesh, rules)
  init_params = None
  if source is not None:
    # Read now, straight into this run's parameter shardings, so that an unreadable checkpoint
    # is refused before anything is written; then the tokenizer is copied (never retrained).
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   nnx.to_pure_dict(spec.template))
    init_params = finetune.load_params(source, abstract_params, spec.param_shardings)
    if is_main:
      finetune.copy_tokenizer(source, run_dir)
  train_ds = data_lib.build_dataset(
      cfg.data, tokenizer, split="train", batch_size=tc.batch_size, seed=tc.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), cache_dir=cache_dir)
  val_ds = data_lib.build_dataset(
      cfg.data, tokenizer, split="val", batch_size=tc.batch_size, seed=tc.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), cache_dir=cache_dir,
      shuffle=False, num_epochs=1)
  if is_main:
    resolved = dataclasses.replace(cfg, model=model_cfg.replace(vocab_size=0)
                                   if cfg.model.vocab_size == 0 else model_cfg, run_dir=run_dir)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
      f.write(OmegaConf.to_yaml(OmegaConf.structured(resolved)))

  schedule = cfg.noise.build()
  ctx = objectives.Context(
      schedule=schedule, mask_id=model_cfg.vocab_size, bos_id=getattr(tokenizer, "bos_id", -1),
      pad_layout=cfg.data.layout == "pad", t_min=cfg.noise.t_min, num_steps=cfg.noise.num_steps,
      antithetic=cfg.noise.antithetic, meap_ratio=tc.meap_ratio)
  tx = make_optimizer(cfg.optim, tc.steps)
  if maria_head is not None:
    tx = hybrid.freeze_backbones(tx, nnx.to_pure_dict(nnx.state(maria_head)))
    spec = maria_spec(maria_head, model_cfg, mesh, rules, cfg.data.seq_len)

  with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else _null():
    state, shardings = init_state(spec, tx, tc.seed, mesh, params=init_params)
    del init_params
    if source is not None:
      if is_main:
        finetune.write_provenance(source, run_dir)
      log.info("Initialised from the %s weights of %s (step %d); fresh optimizer state, EMA, "
               "step counter and data order.", "EMA" if source.ema else "raw", source.run_dir,
               source.step)
    mgr = checkpointing.manager(ckpt_dir, keep=tc.keep_checkpoints)
    train_iter = iter(train_ds)
    start_step = 0
    metrics_log = MetricsLog(run_dir, enabled=is_main)
    if has_ckpt and tc.resume != "never":
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              state, shardings)
      restored = checkpointing.restore_latest(mgr, abstract)
      if restored is None:
        if tc.resume == "required":
          raise TrainingError(f"No readable checkpoint in {ckpt_dir} (train.resume=required).")
        if tc.init_from:  # the state above is a fresh init, not the source's weights
          raise TrainingError(
              f"No readable checkpoint in {ckpt_dir} (the unreadable ones were moved to "
              "checkpoints_unreadable/); run again to start afresh from "
              f"train.init_from={tc.init_from}.")
      else:
        start_step, state, data_state, _ = restored
        train_iter.set_state(decode_iterator_state(data_state))
        metrics_log.truncate_after(start_step)
        log.info("Resumed from step %d of %s", start_step, ckpt_dir)

    train_step = make_train_step(spec, tx, ctx, objective, cfg.optim.ema, cfg.optim.grad_accum,
                                 shardings, mesh, lr_schedule(cfg.optim, tc.steps))
    eval_step = make_eval_step(spec.merge, ctx, objectives.EVAL_OBJECTIVE.get(objective, objective),
                               tc.eval_time_samples, mesh, spec.param_shardings)
    flops_tok = presets.flops_per_token(model_cfg, cfg.data.seq_len)["full"]
    peak = perf.device_peak_flops("float32" if model_cfg.dtype == "float32" else "bfloat16")

    def evaluate(step: int) -> dict:
      key = jax.random.fold_in(jax.random.key(tc.seed), 2 ** 30)
      try:
        ev = evaluate_batches(eval_step, state["ema"], val_ds, mesh, local_batch, key,
                              tc.eval_batches)
      except ValueError as e:
        raise TrainingError(str(e)) from e
      return {"step": step, "val/nll": ev["nll"], "val/nll_stderr": ev["nll_stderr"],
              "val/ppl": ev["ppl"], "val/bpt": ev["bpt"]}

    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    write_status(run_dir, state="running", step=start_step, steps=tc.steps, message="")
    t_start = time.time()
    pending = []  # (step, device metrics) not yet checked / logged
    last_val = None
    tokens_seen = start_step * tc.batch_size * cfg.data.seq_len
    bar = None
    if is_main and tc.progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=tc.steps, initial=start_step, desc="train", dynamic_ncols=True,
                 file=sys.stderr)
    interval_start, interval_tokens = time.time(), 0
    step = start_step

    def flush_pending() -> Optional[dict]:
      """Checks the losses of all pending steps; raises on the first non-finite one."""
      nonlocal pending
      if not pending:
        return None
      values = jax.device_get([m for _, m in pending])
      for (s, _), m in zip(pending, values):
        if not np.isfinite(m["loss"]):
          raise TrainingError(
              f"Non-finite training loss ({m['loss']}) at step {s}. Stopping; the last good "
              f"checkpoint in {ckpt_dir} is kept. Lower optim.lr or check the data.")
      last = values[-1]
      pending = []
      return {k: float(v) for k, v in last.items()}

    def save(step_now: int, metrics: Optional[dict] = None):
      flush_pending()  # never checkpoint a state that followed a non-finite loss
      meta = {"step": step_now, "objective": objective, "tokens": tokens_seen}
      checkpointing.save(mgr, step_now, state, encode_iterator_state(train_iter.get_state()),
                         meta, metrics)

    status, message = "finished", ""
    try:
      while step < tc.steps:
        batch = next(train_iter)
        gbatch = sharding.global_batch(batch, mesh)
        state, metrics = train_step(state, gbatch)
        step += 1
        tokens_seen += tc.batch_size * cfg.data.seq_len
        interval_tokens += tc.batch_size * cfg.data.seq_len
        pending.append((step, metrics))
        if step % tc.log_every == 0 or step == tc.steps:
          last = flush_pending()
          now = time.time()
          tps = interval_tokens / max(now - interval_start, 1e-9)
          interval_start, interval_tokens = now, 0
          record = {"step": step, "tokens": tokens_seen, "wall_time": now - t_start,
                    "train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
                    "train/lr": last["lr"],
                    "train/tokens_per_s": tps, "train/mfu": flops_tok * tps / peak}
          metrics_log.write(record)
          if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
        ckpt_metrics = None
        if step % tc.eval_every == 0 or step == tc.steps:
          flush_pending()
          ev = evaluate(step)
          ev.update(tokens=tokens_seen, wall_time=time.time() - t_start)
          metrics_log.write(ev)
          last_val = ev
          ckpt_metrics = {checkpointing.BEST_METRIC: ev["val/nll"]}
          if bar is not None:
            bar.write(f"step {step}: val nll {ev['val/nll']:.4f} ± {ev['val/nll_stderr']:.4f}, "
                      f"ppl {ev['val/ppl']:.2f}, bits/token {ev['val/bpt']:.3f}")
        if step % tc.checkpoint_every == 0 or step == tc.steps or ckpt_metrics:
          save(step, ckpt_metrics)
        if bar is not None:
          bar.update(1)
        if stop.signal is not None:
          save(step)
          status = "interrupted"
          message = f"stopped by signal {signal.Signals(stop.signal).name} at step {step}"
          break
        if tc.max_wall_minutes and time.time() - t_start > 60 * tc.max_wall_minutes:
          save(step)
          status, message = "interrupted", f"train.max_wall_minutes reached at step {step}"
          break
      flush_pending()
    except TrainingError as e:
      status, message = "failed", str(e)
      raise
    except BaseException as e:
      status, message = "failed", f"{type(e).__name__}: {e}"
      raise
    finally:
      try:
        mgr.wait_until_finished()
        mgr.close()
      finally:
        for s, h in old_handlers.items():
          signal.signal(s, h)
        if bar is not None:
          bar.close()
        metrics_log.close()
        write_status(run_dir, state=status, step=step, steps=tc.steps,
                     wall_time=time.time() - t_start, message=message,
                     **({"val/nll": last_val["val/nll"]} if last_val else {}))
    if message:
      log.warning(message)
  return run_dir


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# ----------------------------------------------------------------------------- CLI


def _hydra_main():
  import hydra
  from hydra.core.hydra_config import HydraConfig
  config_lib.register_configs()

  @hydra.main(version_base=None, config_path=_config_path(), config_name="config")
  def main(hydra_cfg) -> Optional[float]:
    import absl.logging
    absl.logging.set_verbosity(absl.logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
      cfg = config_lib.to_config(hydra_cfg)
    except Exception as e:
      raise SystemExit(f"mdlm.train: invalid config: {e}")
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    try:
      run(cfg, run_dir)
    except (TrainingError, ValueError, FileNotFoundError) as e:
      raise SystemExit(f"mdlm.train: {e}")
    status = json.load(open(os.path.join(run_dir, "status.json")))
    return status.get("val/nll")

  main()


def _config_path() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


if __name__ == "__main__":
  _hydra_main()
