"""What an objective declares, and the registry the trainer, the evaluator and the config read.

An objective is a small object built from its typed settings (the `objective` config group) and
a `Setup` of static facts. It declares
  - `causal`: the attention it trains with;
  - `draw`: the corruption of the *global* batch (before micro-batching), from the step's key and
    the step number (schedules over training need it), and its own state (adaptive proposals);
  - `loss`: per-sequence `LossTerms` (sums and counts) for one (micro-)batch, and `denominator`,
    what the trainer divides the batch's summed loss by, so accumulated micro-batch gradients are
    exactly the full-batch gradient;
  - `measures`: the evaluation measures (mdlm.measures) that apply to a model trained with it; the
    first is what the trainer reports as val/nll;
  - optional hooks: `init_state`/`update_state` (state carried in the train state),
    `given_runs`/`given_model`/`wrap_optimizer` (objectives that train over trained models).
Adding an objective is one module here (a settings class and an Objective subclass, registered
with `register`) plus one YAML file under configs/objective/.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax.numpy as jnp
import numpy as np

from mdlm import config as config_lib
from mdlm.diffusion import LossTerms
from mdlm.schedules import Schedule


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """Static facts an objective may need; closed over by the jitted step."""

  schedule: Schedule
  mask_id: int
  bos_id: int = -1
  special_ids: tuple = ()        # BOS, EOS, PAD: never drawn as random replacement tokens
  pad_layout: bool = False       # pass the padding mask to attention (pad layout only)
  t_min: float = 1e-3
  num_steps: Optional[int] = None
  antithetic: bool = True
  total_steps: int = 1
  masking: config_lib.MaskingConfig = dataclasses.field(default_factory=config_lib.MaskingConfig)
  token_classes: Optional[np.ndarray] = None  # masking.content=weighted: class of each token id
  # The run's objective settings, for measures that read them (bd3lm's block size).
  objective: Optional[config_lib.ObjectiveConfig] = None

  @property
  def vocab_size(self) -> int:
    return self.mask_id

  def attention_mask(self, batch):
    """The key mask for attention: the padding mask in the pad layout, else none."""
    return batch["token_mask"] if self.pad_layout else None


class Objective:
  """Base class; see the module docstring. Subclasses set the class attributes below."""

  name: ClassVar[str] = ""
  settings_class: ClassVar[type] = config_lib.ObjectiveConfig
  causal: ClassVar[bool] = False
  measures: ClassVar[tuple[str, ...]] = ()

  def __init__(self, settings: config_lib.ObjectiveConfig, setup: Setup):
    self.settings = settings
    self.setup = setup

  @property
  def stateful(self) -> bool:
    return self.init_state() is not None

  def init_state(self) -> Any:
    """Objective state carried in the train state (checkpointed with it); None: stateless."""
    return None

  def draw(self, batch: dict, key, step, state) -> dict:
    """Arrays to add to the global batch before micro-batching (corrupted inputs, times)."""
    del batch, key, step, state
    return {}

  def loss(self, model, batch: dict, key, *, dropout_key=None) -> tuple[LossTerms, dict]:
    """(per-sequence LossTerms, aux for update_state) of one (micro-)batch."""
    raise NotImplementedError

  def denominator(self, batch: dict):
    """What the summed loss of the global batch is divided by (float32 scalar)."""
    raise NotImplementedError

  def update_state(self, state, batch: dict, terms: LossTerms, aux: dict):
    del batch, terms, aux
    return state

  @classmethod
  def needs_token_classes(cls, settings, cfg) -> bool:
    """Whether the Setup must carry the class of every token id (content-weighted masking)."""
    del settings, cfg
    return False

  # Hooks for objectives that train over given, already trained models (MARIA). Class-level: the
  # models (and their tokenizer) are known before the Setup is. The caller loads the runs named
  # by `given_runs` (mdlm.rundir.load_run) and passes them to `given_model`.
  @classmethod
  def given_runs(cls, settings) -> dict[str, str]:
    """{role: run directory} of the trained models this objective trains over; {}: none."""
    del settings
    return {}

  @classmethod
  def given_model(cls, settings, runs: dict) -> tuple[Any, Any]:
    """(module holding the given models' parameters, their tokenizer) from the loaded runs."""
    raise NotImplementedError(f"objective {cls.name} trains a fresh model")

  @classmethod
  def wrap_optimizer(cls, tx, params):
    """The optimizer for the given parameters (e.g. with frozen parts)."""
    del params
    return tx


_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
  """Registers an Objective subclass and its settings class (the `objective` config group)."""
  if not cls.name or cls.settings_class().name != cls.name:
    raise TypeError(f"{cls.__name__}: name {cls.name!r} must equal its settings' default name.")
  config_lib.register_objective(cls.settings_class)
  _REGISTRY[cls.name] = cls
  return cls


def get(name: str) -> type[Objective]:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown objective {name!r}; available: {', '.join(sorted(_REGISTRY))}.")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(settings: config_lib.ObjectiveConfig, setup: Setup) -> Objective:
  return get(settings.name)(settings, setup)


def real_token_count(batch) -> jnp.ndarray:
  return jnp.sum(jnp.asarray(batch["token_mask"], bool)).astype(jnp.float32)


def refuse_labelled_data(cfg: config_lib.Config, name: str) -> None:
  """MEAP-SFT batches (data.meap_sft) carry the masking and the labels in the data; only the ar
  objective scores them as they are (another would mask again, or ignore the labels)."""
  config_lib._check(not cfg.data.meap_sft,
                    f"data.meap_sft=true trains with objective=ar (the masking is in the data), "
                    f"not objective={name}; set objective=ar (or experiment=meap_sft)")


def settings_for(cfg: config_lib.Config, name: str) -> config_lib.ObjectiveConfig:
  """The settings of objective `name` in this run: cfg.objective when it is that objective,
  else that objective's defaults (a training phase)."""
  if cfg.objective.name == name:
    return cfg.objective
  return get(name).settings_class()


def run_objectives(cfg: config_lib.Config) -> list[config_lib.ObjectiveConfig]:
  """The settings of every objective the run trains with, in order of first use (one unless
  train.phases is set)."""
  if not cfg.train.phases:
    return [cfg.objective]
  names_in_order = list(dict.fromkeys(p.objective for p in cfg.train.phases))
  return [settings_for(cfg, n) for n in names_in_order]


def make_setup(cfg: config_lib.Config, mask_id: int, tokenizer=None,
               token_classes: Optional[np.ndarray] = None) -> Setup:
  """The Setup of a run: its schedule, time sampling, masking and the tokenizer's special ids."""
  specials = tuple(int(i) for i in (getattr(tokenizer, "bos_id", -1),
                                    getattr(tokenizer, "eos_id", -1),
                                    getattr(tokenizer, "pad_id", -1)) if i is not None and i >= 0)
  return Setup(schedule=cfg.noise.build(), mask_id=mask_id,
               bos_id=getattr(tokenizer, "bos_id", -1), special_ids=specials,
               pad_layout=cfg.data.layout == "pad", t_min=cfg.noise.t_min,
               num_steps=cfg.noise.num_steps, antithetic=cfg.noise.antithetic,
               total_steps=cfg.train.steps, masking=cfg.masking, token_classes=token_classes,
               objective=cfg.objective)
