"""Typed configuration of `python -m mdlm.sample` (YAML presets in configs/sampler/ set values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from mdlm.config import MeshConfig

SAMPLERS = ("ancestral", "confidence", "semi_ar", "maria", "block")


@dataclass
class SamplerConfig:
  """One sampler and its settings; fields a sampler does not use are ignored by it.

  name: "ancestral" (MDLM, cached by default), "confidence" (LLaDA / Fast-dLLM), "semi_ar"
    (windows of `window` tokens, `stride` new tokens each, filled by `inner`) or "maria" (the
    MARIA head of a run trained with objective=maria: one denoiser pass, then left-to-right
    KV-cached AR decoding; uses temperature, top_p and refresh_every only).
  steps: T for ancestral (per window for semi_ar), the step budget for confidence.
  temperature: 0 = greedy (argmax). The confidence presets (confidence, fast_dllm) keep LLaDA's
    default of 0 on purpose, so that they reproduce LLaDA's (and Fast-dLLM's) greedy decoding:
    predictions are argmax and low-confidence remasking commits the most confident, so the
    sampler is deterministic and every sample from one starting sequence is the same (for
    unconditional generation, every sample); so is maria at 0 (greedy decoding). The CLI then
    warns on stderr when num_samples > 1 and records identical_by_construction in the summary.
    Set temperature > 0 (e.g. 1.0: exact draws from the model) or remasking=random for distinct
    samples. ancestral, semi_ar and maria default to 1.0.
  guidance: unsupervised CFG weight w (SMDM) on the prompt / template tokens; 0 = off.
  refresh_every: maria: recompute the denoiser states every k filled tokens; 0 = one pass.
  kv_cache: confidence: Fast-dLLM's approximate KV cache, "none", "prefix" (each step recomputes
    the block and all after it against the cached prefix) or "dual" (only the block, against the
    cached prefix and suffix); refreshed at block boundaries, so block_length is required
    (mdlm.sampling.fast_dllm).
  kv_refresh: with kv_cache, also refresh the cache every k steps inside a block (0: at block
    boundaries only, as Fast-dLLM; 1: every step, which is the uncached sampler exactly).
  block: block diffusion (BD3-LM, mdlm.sampling.block): blocks of block_size tokens (default: the
    run's objective.block_size), each filled by `inner` (ancestral or confidence; `steps` per
    block) against an exact KV cache of the clean blocks (block_kv_cache=false recomputes the
    prefix at every call); context: cache slots (default: the run's data.seq_len); stop_at_eos:
    stop each sample at its first generated EOS (any length, past the training length too).
  """

  name: str = "ancestral"
  steps: int = 128
  cache: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  grid: str = "uniform"
  t_end: float = 1e-5
  block_length: Optional[int] = None
  threshold: Optional[float] = None
  remasking: str = "low_confidence"
  window: Optional[int] = None     # semi_ar: default = the model's maximum length
  stride: Optional[int] = None     # semi_ar: default = window // 2
  inner: str = "ancestral"         # semi_ar: the sampler filling each window
  guidance: float = 0.0
  refresh_every: int = 0           # maria: denoiser refresh every k fills (0: never)
  kv_cache: str = "none"           # confidence: none | prefix | dual (Fast-dLLM)
  kv_refresh: int = 0              # confidence with kv_cache: also refresh every k steps
  block_size: Optional[int] = None  # block: default = the run's objective.block_size
  context: Optional[int] = None     # block: cache slots; default = the run's data.seq_len
  block_kv_cache: bool = True       # block: exact KV cache (false: recompute the prefix)
  stop_at_eos: bool = True          # block: stop at the first generated EOS

  def settings(self, schedule, mask_id: int) -> dict[str, Any]:
    """Keyword arguments for mdlm.sampling.run_sampler."""
    if self.name == "maria":  # mdlm.sampling.maria.maria_infill
      return dict(mask_id=mask_id, temperature=self.temperature, top_p=self.top_p,
                  refresh_every=self.refresh_every)
    inner = self.inner if self.name in ("semi_ar", "block") else self.name
    if inner == "ancestral":
      kw = dict(steps=self.steps, schedule=schedule, cache=self.cache,
                temperature=self.temperature, top_p=self.top_p, grid=self.grid, t_end=self.t_end)
    elif inner == "confidence":
      kw = dict(steps=self.steps, block_length=self.block_length, threshold=self.threshold,
                temperature=self.temperature, remasking=self.remasking)
      if self.name == "confidence" and (self.kv_cache != "none" or self.kv_refresh):
        kw.update(kv_cache=self.kv_cache, kv_refresh=self.kv_refresh)  # mdlm.sampling.fast_dllm
    else:
      raise ValueError(f"sampler.inner={self.inner!r}; choose ancestral or confidence.")
    kw["mask_id"] = mask_id
    if self.name == "semi_ar":
      kw.update(inner=self.inner, window=self.window, stride=self.stride)
    if self.name == "block":  # block_size, context, eos_id: filled from the run by mdlm.sample
      kw.update(inner=self.inner, block_size=self.block_size, context=self.context,
                kv_cache=self.block_kv_cache)
    return kw


@dataclass
class SampleConfig:
  """run: a run directory or one of its checkpoint step directories (required).
  length: tokens per sample (default: the run's data.seq_len; beyond the model's maximum only
    with sampler=semi_ar). prompt: text after BOS to continue; template: text with [MASK] /
    [MASK*n] markers to fill. On the command line both are taken as literal text:
    template="The [MASK*5] of Denmark" works as the shell delivers it (no Hydra quoting needed).
  output: JSON Lines file; never overwritten (an existing one is refused before anything loads).
    Default: <run>/samples/<sampler>-seed<seed>.jsonl, numbered -1, -2, ... once that exists.
  evaluator: an AR run directory for generative perplexity (optional).
  mesh: the (data, fsdp, tensor) device mesh, as in training. By default every device is on the
    data axis. With more than one device the denoiser's parameters are placed by mesh.rules and
    each batch is split over data x fsdp, so batch_size must be a multiple of that size. The
    maria sampler runs on one device.
  """

  run: str = "???"
  step: Optional[int] = None
  ema: bool = True
  sampler: SamplerConfig = field(default_factory=SamplerConfig)
  num_samples: int = 8
  batch_size: int = 8
  length: Optional[int] = None
  prompt: Optional[str] = None
  template: Optional[str] = None
  add_bos: bool = True
  seed: int = 0
  output: Optional[str] = None
  evaluator: Optional[str] = None
  print_samples: bool = True
  progress: bool = True
  mesh: MeshConfig = field(default_factory=MeshConfig)


def validate(cfg: SampleConfig) -> SampleConfig:
  s = cfg.sampler

  def check(ok, msg):
    if not ok:
      raise ValueError(f"Invalid sampling config: {msg}")

  check(cfg.run not in (None, "", "???"), "run=<run directory or checkpoint> is required")
  check(s.name in SAMPLERS, f"sampler.name={s.name!r}; choose one of {SAMPLERS}")
  check(s.steps >= 1, f"sampler.steps={s.steps} must be >= 1")
  check(cfg.num_samples >= 1 and cfg.batch_size >= 1, "num_samples and batch_size must be >= 1")
  check(cfg.length is None or cfg.length >= 1, f"length={cfg.length} must be >= 1")
  check(not (cfg.prompt and cfg.template), "give either prompt or template, not both")
  check(s.guidance == 0.0 or cfg.prompt or cfg.template,
        "sampler.guidance needs a prompt or template (the tokens it guides on)")
  check(s.guidance == 0.0 or s.name != "semi_ar", "guidance is not supported with semi_ar")
  check(s.guidance == 0.0 or s.name != "maria",
        "guidance is not supported with sampler=maria (the head has no unconditional branch); "
        "set sampler.guidance=0")
  check(s.guidance == 0.0 or s.name != "block",
        "guidance is not supported with sampler=block (it runs the model through its KV cache); "
        "set sampler.guidance=0")
  check(s.block_size is None or s.block_size >= 1,
        f"sampler.block_size={s.block_size} must be >= 1 (or null: the run's block size)")
  check(s.context is None or s.context >= 1,
        f"sampler.context={s.context} must be >= 1 (or null: the run's data.seq_len)")
  check(s.refresh_every >= 0, f"sampler.refresh_every={s.refresh_every} must be >= 0 (0: one "
        "denoiser pass)")
  _validate_kv_cache(s, check)
  check(s.temperature >= 0, f"sampler.temperature={s.temperature} must be >= 0 (0: greedy)")
  check(0.0 < s.top_p <= 1.0, f"sampler.top_p={s.top_p} must lie in (0, 1]")
  return cfg


def _validate_kv_cache(s: SamplerConfig, check) -> None:
  """Fast-dLLM's KV caches: the confidence sampler only, in blocks (mdlm.sampling.fast_dllm)."""
  kinds = ("none", "prefix", "dual")
  check(s.kv_cache in kinds, f"sampler.kv_cache={s.kv_cache!r}; choose one of {kinds}")
  check(s.kv_refresh >= 0, f"sampler.kv_refresh={s.kv_refresh} must be >= 0 (0: refresh the KV "
        "cache at block boundaries only)")
  if s.kv_cache == "none":
    check(s.kv_refresh == 0, f"sampler.kv_refresh={s.kv_refresh} refreshes a KV cache: set "
          "sampler.kv_cache=prefix or dual, or sampler.kv_refresh=0")
    return
  check(s.name == "confidence", f"sampler.kv_cache={s.kv_cache} is Fast-dLLM's cache for "
        f"sampler=confidence / fast_dllm, not sampler={s.name}; set sampler.kv_cache=none")
  check(s.block_length is not None, f"sampler.kv_cache={s.kv_cache} is refreshed at block "
        "boundaries: set sampler.block_length (Fast-dLLM: 32; the whole generation for one block)")


def register_configs() -> None:
  cs = ConfigStore.instance()
  cs.store(name="base_sample", node=SampleConfig)
  cs.store(group="sampler", name="base_sampler", node=SamplerConfig)

