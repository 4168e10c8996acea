"""Model families for scaling sweeps: (layers, width, heads) configurations over a parameter range.

A family is an ordered list of sizes plus the architecture fields every member shares (kind, MLP,
norm, ...). Parameter and FLOP counts come from `mdlm.models.presets.count_params` /
`flops_per_token`, the accounting the trainer uses; N means non-embedding parameters (Kaplan et
al. 2020, "Scaling Laws for Neural Language Models"; SMDM, Nie et al. 2024, "Scaling up Masked
Diffusion Models on Text").

Two ways to build one:
- `smdm_family()`: the sizes of SMDM's IsoFLOP study (their Table of model configurations),
  LLaMA-style blocks (RMSNorm, SwiGLU of width 4d), head dim 64 up to 336M and 128 from 472M.
- `aspect_family(n_min, n_max, num)`: sizes spread geometrically in N under a fixed aspect-ratio
  rule d_model ~ aspect_ratio * num_layers (width a multiple of the head dim).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from mdlm.config import ModelConfig
from mdlm.models.presets import count_params, flops_per_token

FLOP_CONVENTIONS = ("6N", "full")


@dataclasses.dataclass(frozen=True)
class Size:
  """One member of a family. d_ff = 0 means the ModelConfig default for the family's MLP."""

  name: str
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int = 0


@dataclasses.dataclass(frozen=True)
class Family:
  """Sizes sharing one architecture. `model` holds the shared ModelConfig fields (no sizes)."""

  name: str
  sizes: tuple[Size, ...]
  model: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.sizes:
      raise ValueError(f"family {self.name!r} has no sizes; give at least one Size.")
    names = [s.name for s in self.sizes]
    if len(set(names)) != len(names):
      raise ValueError(f"family {self.name!r} has duplicate size names: {names}")
    bad = {"num_layers", "d_model", "num_heads", "d_ff", "name"} & set(self.model)
    if bad:
      raise ValueError(f"family {self.name!r}: model fields {sorted(bad)} belong to each Size.")

  def config(self, size: Size | str, *, kind: str | None = None, seq_len: int | None = None,
             vocab_size: int | None = None) -> ModelConfig:
    """The validated ModelConfig of one member (kind / max_seq_len / vocab_size overridable)."""
    size = self[size] if isinstance(size, str) else size
    fields = dict(self.model)
    if kind is not None:
      fields["kind"] = kind
    if seq_len is not None:
      fields["max_seq_len"] = seq_len
    if vocab_size is not None:
      fields["vocab_size"] = vocab_size
    return ModelConfig(name=size.name, num_layers=size.num_layers, d_model=size.d_model,
                       num_heads=size.num_heads, d_ff=size.d_ff, **fields).validate()

  def __getitem__(self, name: str) -> Size:
    for s in self.sizes:
      if s.name == name:
        return s
    raise KeyError(f"family {self.name!r} has no size {name!r}; sizes: "
                   f"{[s.name for s in self.sizes]}")

  def __len__(self):
    return len(self.sizes)

  def __iter__(self):
    return iter(self.sizes)

  def counts(self, size: Size | str, *, kind: str | None = None, vocab_size: int = 0) -> dict:
    """count_params of one member (vocab_size only affects the embedding / total counts)."""
    return count_params(self.config(size, kind=kind), vocab_size)

  def non_embedding_params(self, size: Size | str, kind: str | None = None) -> int:
    return self.counts(size, kind=kind)["non_embedding"]

  def flops_per_token(self, size: Size | str, *, seq_len: int, vocab_size: int,
                      convention: str = "6N", kind: str | None = None) -> float:
    """Training FLOPs per token under `convention` ("6N" as SMDM, or "full": matmuls incl. the
    output head plus attention)."""
    if convention not in FLOP_CONVENTIONS:
      raise ValueError(f"FLOP convention {convention!r}; choose one of {FLOP_CONVENTIONS}.")
    cfg = self.config(size, kind=kind, seq_len=seq_len)
    return flops_per_token(cfg, seq_len, vocab_size)[convention]

  def table(self, *, vocab_size: int = 0, kind: str | None = None) -> list[dict]:
    rows = []
    for s in self.sizes:
      c = self.counts(s, kind=kind, vocab_size=vocab_size)
      rows.append({"name": s.name, "num_layers": s.num_layers, "d_model": s.d_model,
                   "num_heads": s.num_heads, "d_ff": self.config(s).ff_dim,
                   "non_embedding": c["non_embedding"], "total": c["total"]})
    return rows

  def to_dict(self) -> dict:
    return {"name": self.name, "model": dict(self.model),
            "sizes": [dataclasses.asdict(s) for s in self.sizes]}

  @classmethod
  def from_dict(cls, d: dict) -> "Family":
    return cls(name=d["name"], model=dict(d.get("model", {})),
               sizes=tuple(Size(**s) for s in d["sizes"]))


# ---------------------------------------------------------------------------------------------
# SMDM's sizes.

# name: (layers, width). Head dim 64 up to 336M, 128 from 472M; SwiGLU hidden width 4d except the
# 75M model (FFN 1600).
SMDM_SIZES: dict[str, tuple[int, int]] = {
    "6M": (6, 256), "19M": (8, 384), "34M": (8, 512), "48M": (9, 576), "66M": (10, 640),
    "75M": (16, 640), "85M": (13, 640), "113M": (12, 768), "142M": (15, 768), "170M": (18, 768),
    "180M": (14, 896), "206M": (16, 896), "231M": (18, 896), "268M": (16, 1024),
    "302M": (18, 1024), "336M": (20, 1024), "472M": (18, 1280), "551M": (21, 1280),
    "571M": (18, 1408), "629M": (24, 1280), "666M": (21, 1408), "717M": (19, 1536),
    "761M": (24, 1408), "831M": (22, 1536), "944M": (25, 1536), "1028M": (20, 1792),
    "1233M": (24, 1792), "1476M": (22, 2048), "1678M": (25, 2048), "2121M": (28, 2176),
}
SMDM_FFN_OVERRIDE = {"75M": 1600}
SMDM_MODEL = {"mlp": "swiglu", "norm": "rmsnorm"}


def smdm_non_embedding(num_layers: int, d_model: int) -> int:
  """SMDM's own closed form (a CHECK against their table, not used for planning):
  N = layers (16 d^2 + 2d) + d for a LLaMA block with SwiGLU width 4d (4d^2 attention + 12d^2
  MLP + two RMSNorm scales) and a final norm."""
  return num_layers * (16 * d_model * d_model + 2 * d_model) + d_model


def smdm_family(names: Sequence[str] | None = None) -> Family:
  """SMDM's sizes as a Family (LLaMA-style: RMSNorm, SwiGLU width 4d except 75M)."""
  names = list(SMDM_SIZES) if names is None else list(names)
  sizes = []
  for name in names:
    if name not in SMDM_SIZES:
      raise ValueError(f"unknown SMDM size {name!r}; choose from {list(SMDM_SIZES)}")
    layers, d = SMDM_SIZES[name]
    head_dim = 64 if int(name[:-1]) <= 336 else 128
    sizes.append(Size(name=name, num_layers=layers, d_model=d, num_heads=d // head_dim,
                      d_ff=SMDM_FFN_OVERRIDE.get(name, 4 * d)))
  return Family(name="smdm", sizes=tuple(sizes), model=dict(SMDM_MODEL))


# ---------------------------------------------------------------------------------------------
# Fixed aspect-ratio families.


def aspect_family(n_min: float, n_max: float, num: int, *, aspect_ratio: float = 32.0,
                  head_dim: int = 16, min_layers: int = 1, max_layers: int = 64,
                  name: str = "aspect", **model_fields) -> Family:
  """`num` sizes whose non-embedding N spreads geometrically over [n_min, n_max].

  Rule: for each depth L, width d = round(aspect_ratio * L / head_dim) * head_dim (at least one
  head). Among those candidates, each geometric target N takes the one nearest in log N; no size
  is used twice. `model_fields` are shared ModelConfig fields (mlp, norm, ...).
  """
  if not (n_min > 0 and n_max >= n_min):
    raise ValueError(f"need 0 < n_min <= n_max, got n_min={n_min}, n_max={n_max}")
  if num < 1 or aspect_ratio <= 0 or head_dim < 2 or head_dim % 2:
    raise ValueError("need num >= 1, aspect_ratio > 0 and an even head_dim >= 2")
  base = Family(name=name, sizes=(Size("probe", 1, head_dim, 1),), model=model_fields)
  candidates = []
  for layers in range(min_layers, max_layers + 1):
    d = max(head_dim, int(round(aspect_ratio * layers / head_dim)) * head_dim)
    size = Size(name=f"L{layers}-d{d}", num_layers=layers, d_model=d, num_heads=d // head_dim)
    candidates.append((base.non_embedding_params(size), size))
  targets = [n_min] if num == 1 else [
      math.exp(math.log(n_min) + i * (math.log(n_max) - math.log(n_min)) / (num - 1))
      for i in range(num)]
  chosen: list[Size] = []
  for target in targets:
    free = [(abs(math.log(n) - math.log(target)), size) for n, size in candidates
            if size not in chosen]
    if not free:
      break
    chosen.append(min(free, key=lambda t: t[0])[1])
  chosen.sort(key=lambda s: base.non_embedding_params(s))
  lo, hi = base.non_embedding_params(chosen[0]), base.non_embedding_params(chosen[-1])
  if lo > 2 * n_max or hi < n_min / 2:
    raise ValueError(f"no depth in [{min_layers}, {max_layers}] with aspect ratio {aspect_ratio} "
                     f"reaches N in [{n_min:g}, {n_max:g}]; adjust the range or the rule.")
  return Family(name=name, sizes=tuple(chosen), model=dict(model_fields))


def explicit_family(sizes: Sequence[Sequence[int] | dict], *, name: str = "explicit",
                    **model_fields) -> Family:
  """A family from [(layers, d_model, num_heads), ...] or dicts with those keys (+ d_ff)."""
  out = []
  for s in sizes:
    if isinstance(s, dict):
      s = dict(s)
      s.setdefault("name", f"L{s['num_layers']}-d{s['d_model']}")
      out.append(Size(**s))
    else:
      layers, d, heads = s[:3]
      out.append(Size(name=f"L{layers}-d{d}", num_layers=int(layers), d_model=int(d),
                      num_heads=int(heads), d_ff=int(s[3]) if len(s) > 3 else 0))
  return Family(name=name, sizes=tuple(out), model=dict(model_fields))
