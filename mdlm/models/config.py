"""The model configuration: one typed dataclass shared by the denoiser and the AR baseline."""

from __future__ import annotations

import dataclasses
from typing import Optional

KINDS = ("denoiser", "ar")
MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class ModelConfig:
  """Architecture of a pre-norm rotary transformer.

  kind: "denoiser" (bidirectional, MDLM) or "ar" (causal next-token baseline).
  d_ff: MLP hidden width; 0 means 4 d_model for GELU and 8/3 d_model (rounded to 64) for SwiGLU.
  vocab_size: real tokens V; 0 means "take it from the tokenizer". The embedding has V + 1 rows
    (row V is the mask token); the output head has V columns (SUBS never predicts the mask).
  time_conditioning: DiT-style adaLN-zero on the noise level (off by default, as in MDLM).
  dtype: compute dtype; parameters are always float32.
  """

  name: str = "custom"
  kind: str = "denoiser"
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
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

  @property
  def causal(self) -> bool:
    return self.kind == "ar"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

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
    if self.dtype not in DTYPES:
      bad(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    for field in ("num_layers", "d_model", "num_heads", "max_seq_len", "cond_dim"):
      if getattr(self, field) < 1:
        bad(f"{field} must be >= 1, got {getattr(self, field)}")
    if self.d_ff < 0 or self.vocab_size < 0:
      bad("d_ff and vocab_size must be >= 0")
    if self.d_model % self.num_heads:
      bad(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.head_dim % 2:
      bad(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if not 0.0 <= self.dropout < 1.0:
      bad(f"dropout must lie in [0, 1), got {self.dropout}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      bad(f"attention_impl must be null, 'xla' or 'cudnn', got {self.attention_impl!r}")
    return self

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
