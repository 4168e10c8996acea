"""The run directory: the one place that knows its layout.

  config.yaml      the resolved config (read by evaluate, sample, resume and fine-tuning)
  status.json      running | finished | failed | interrupted, step, tokens, last loss, message
  metrics.jsonl    one JSON object per event (train/*, val/*)
  tokenizer/       the tokenizer (a trained sentencepiece model is cached here)
  checkpoints/     orbax checkpoints (mdlm.checkpointing), one directory per step
  checkpoints_unreadable/   checkpoints that could not be read, moved aside (never deleted)
  data_cache/      tokenized splits
  tb/              TensorBoard scalars
  samples/         outputs of `python -m mdlm.sample`
  init_from.json   what a fine-tune started from
  convert.json     what an imported checkpoint came from (python -m mdlm.convert)
  overrides.yaml   the command-line overrides of each start

Every module that reads or writes a run goes through `RunDir`; `load_run` gives a trained model,
its tokenizer and config for evaluation, sampling and notebooks.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

import jax
import yaml
from flax import nnx
from omegaconf import OmegaConf

from mdlm import checkpointing
from mdlm import config as config_lib
from mdlm import data as data_lib
from mdlm import models
from mdlm import objectives


class RunDir:
  """Paths and small records of one run directory."""

  CONFIG, STATUS, METRICS = "config.yaml", "status.json", "metrics.jsonl"
  RECORD_FILES = (CONFIG, STATUS, METRICS)  # a directory holding any of these is a run

  def __init__(self, path: str):
    self.path = os.path.abspath(path)

  def __repr__(self) -> str:
    return f"RunDir({self.path!r})"

  def join(self, *names: str) -> str:
    return os.path.join(self.path, *names)

  config_path = property(lambda self: self.join(self.CONFIG))
  status_path = property(lambda self: self.join(self.STATUS))
  metrics_path = property(lambda self: self.join(self.METRICS))
  tokenizer_dir = property(lambda self: self.join("tokenizer"))
  checkpoints_dir = property(lambda self: self.join("checkpoints"))
  unreadable_dir = property(lambda self: self.join("checkpoints_unreadable"))
  data_cache_dir = property(lambda self: self.join("data_cache"))
  tb_dir = property(lambda self: self.join("tb"))
  samples_dir = property(lambda self: self.join("samples"))
  init_from_path = property(lambda self: self.join("init_from.json"))
  convert_path = property(lambda self: self.join("convert.json"))
  overrides_path = property(lambda self: self.join("overrides.yaml"))

  @classmethod
  def find(cls, path: str) -> tuple["RunDir", Optional[int]]:
    """A run directory, or one of its checkpoints/<step> directories (then also that step)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"No run directory or checkpoint at {path}.")
    if os.path.exists(os.path.join(path, cls.CONFIG)):
      return cls(path), None
    parent = os.path.dirname(path)
    run = cls(os.path.dirname(parent))
    if os.path.basename(parent) == "checkpoints" and os.path.exists(run.config_path):
      try:
        return run, int(os.path.basename(path))
      except ValueError:
        pass
    raise FileNotFoundError(
        f"{path} is neither a run directory (with config.yaml) nor a checkpoint step directory "
        "(<run_dir>/checkpoints/<step>).")

  # ----------------------------------------------------------------------------- records

  def has_checkpoints(self) -> bool:
    d = self.checkpoints_dir
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))

  def has_tokenizer(self) -> bool:
    return os.path.isdir(self.tokenizer_dir) and bool(os.listdir(self.tokenizer_dir))

  def load_config(self) -> config_lib.Config:
    return load_config_file(self.config_path)

  def write_config(self, cfg: config_lib.Config) -> None:
    _write_atomic(self.config_path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))

  def write_overrides(self, overrides: list[str]) -> None:
    """Appends this start's command-line overrides (a list per start)."""
    with open(self.overrides_path, "a") as f:
      f.write(yaml.safe_dump([list(overrides)], default_flow_style=None))

  def write_status(self, **fields) -> None:
    _write_atomic(self.status_path, json.dumps(fields, indent=1))

  def read_status(self) -> Optional[dict]:
    try:
      with open(self.status_path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def read_metrics(self) -> list[dict]:
    """metrics.jsonl events; a torn last line (a run killed mid-write) is skipped."""
    if not os.path.exists(self.metrics_path):
      return []
    events = []
    with open(self.metrics_path) as f:
      for line in f:
        try:
          events.append(json.loads(line))
        except ValueError:
          continue
    return events

  def checkpoint_steps(self) -> list[int]:
    return checkpointing.checkpoint_steps(self.checkpoints_dir)


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# Keys of configs written before objectives had their own group (train.objective & co).
_LEGACY_TRAIN_KEYS = {"objective": "name", "meap_ratio": "ratio",
                      "maria_denoiser_run": "denoiser_run", "maria_ar_run": "ar_run"}


def load_config_file(path: str) -> config_lib.Config:
  """A config.yaml read back into the typed, validated Config (the objective's own schema picked
  by its name; configs of older runs, with train.objective, are read too)."""
  raw = OmegaConf.to_container(OmegaConf.load(path))
  train = raw.setdefault("train", {}) or {}
  if "objective" in train and not isinstance(train.get("objective"), dict):
    legacy = {new: train.pop(old) for old, new in _LEGACY_TRAIN_KEYS.items() if old in train}
    obj = raw.setdefault("objective", {})
    legacy_name = legacy.pop("name")
    legacy = {k: v for k, v in legacy.items() if v is not None}
    if legacy_name != "auto":
      legacy = {k: v for k, v in legacy.items()
                if (legacy_name, k) in {("meap", "ratio"), ("maria", "denoiser_run"),
                                        ("maria", "ar_run")}}
    else:
      legacy = {}
    obj.update(name=legacy_name, **legacy)
  name = (raw.get("objective") or {}).get("name", "auto")
  schema = OmegaConf.structured(config_lib.Config)
  settings = config_lib.objective_configs().get(name)
  if settings is not None:
    schema.objective = OmegaConf.structured(settings)
  cfg = OmegaConf.to_object(OmegaConf.merge(schema, raw))
  return config_lib.validate(cfg)


class LoadedRun(NamedTuple):
  model: Any          # the trained module (EMA weights by default): a Transformer, or the module
                      # of an objective that trains over given models (a MARIA head)
  tokenizer: Any
  config: Any         # mdlm.config.Config
  step: int
  run_dir: str


def load_run(path: str, *, ema: bool = True, step: Optional[int] = None) -> LoadedRun:
  """A trained model, its tokenizer and config, from a run directory or checkpoint directory.

  For an objective that trains over given runs (objective=maria) the module is rebuilt over those
  runs (they supply the architecture) and all of its parameters come from this run's checkpoint."""
  run, path_step = RunDir.find(path)
  step = step if step is not None else path_step
  cfg = run.load_config()
  objective = objectives.get(cfg.objective.name)
  given = objective.given_runs(cfg.objective)
  if given:
    module, tokenizer = objective.given_model(
        cfg.objective, {role: load_run(p, ema=ema) for role, p in given.items()})
  else:
    tokenizer = data_lib.load_tokenizer(run.tokenizer_dir)
    model_cfg = cfg.model.replace(vocab_size=tokenizer.vocab_size)
    module = nnx.eval_shape(lambda: models.build(model_cfg))
  graphdef, state = nnx.split(module)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(state))
  weights, s = checkpointing.restore_params(run.checkpoints_dir, abstract, ema=ema, step=step)
  nnx.replace_by_pure_dict(state, weights)
  return LoadedRun(nnx.merge(graphdef, state), tokenizer, cfg, s, run.path)


def load_config(path: str) -> config_lib.Config:
  """The config of the run at `path` (a run directory or one of its checkpoint directories)."""
  return RunDir.find(path)[0].load_config()
