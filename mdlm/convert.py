"""Imports published MDLM and BD3-LM checkpoints (MDLM's DiT) into an mdlm run directory.

  python -m mdlm.convert --checkpoint <model.safetensors, or a Hugging Face snapshot directory> \\
      --tokenizer <directory with GPT-2's vocab.json + merges.txt> --out runs/mdlm_owt

The result is an ordinary run directory (config.yaml, tokenizer/, checkpoints/0, convert.json)
that `python -m mdlm.evaluate`, `python -m mdlm.sample` and fine-tuning (`train.init_from`) read
unchanged. Everything is checked before anything is written or compiled; the run is assembled in
a temporary directory next to --out and renamed into place, so a refusal or a failure leaves
nothing behind.

The architecture is the diffusion transformer of "Simple and Effective Masked Diffusion Language
Models" (Sahoo et al. 2024), a DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie
2023) over tokens, which "Block Diffusion: Interpolating Between Autoregressive and Diffusion
Language Models" (Arriola et al. 2025, BD3-LM) reuses. Its tensors (PyTorch Linear weights are
[out, in]), under a prefix (`backbone.` in the Hugging Face checkpoints):

  vocab_embed.embedding [V+1, D]        token embedding; row V is the mask (GPT-2: V = 50257)
  sigma_map.mlp.{0,2}.{weight,bias}     timestep MLP: Linear(256 -> C), SiLU, Linear(C -> C) on
                                        [cos, sin] of sigma * 10^(-4 k / 128), sigma = -log alpha;
                                        the blocks read c = SiLU(its output)
  blocks.i.norm{1,2}.weight [D]         LayerNorm without bias, eps 1e-5
  blocks.i.attn_qkv.weight [3D, D]      packed as (q|k|v, head, head_dim), no bias; rotary
                                        (rotate-half form, base 10^4) on q and k
  blocks.i.attn_out.weight [D, D]       no bias
  blocks.i.mlp.{0,2}.{weight,bias}      Linear(D -> 4D), GELU (tanh), Linear(4D -> D)
  blocks.i.adaLN_modulation.{weight,bias}  Linear(C -> 6D): shift, scale, gate of the attention,
                                        then of the MLP; x + gate * f(LN(x) (1 + scale) + shift)
  output_layer.{norm_final, adaLN_modulation (C -> 2D: shift, scale), linear [V+1, D] + bias}
  rotary_emb.inv_freq [head_dim / 2]    a buffer, optional; checked against base 10^4

The published checkpoints were trained with time_conditioning off: the DiT then embeds sigma = 0
(ModelConfig.adaln_without_time). BD3-LM may drop adaLN (config adaln: false); its block-causal
attention masks belong to the objective and the sampler, not to the weights: a BD3-LM run gets
objective=bd3lm with config.json's block_size (and the clipped mask-rate range its buffers hold,
when its search narrowed it), so evaluate reports its block NELBO and `sampler=block` samples it
block by block. The output row of the mask is dropped:
SUBS sets the mask's logit to -inf, so the V-way head gives the same distributions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from mdlm import checkpointing, cli, models, train
from mdlm import config as config_lib
from mdlm.data import tokenizers
from mdlm.rundir import RunDir

log = logging.getLogger("mdlm.convert")

ARCHITECTURES = ("mdlm", "bd3lm")  # config.json model_type of MDLM's DiT
EMBEDDING = "vocab_embed.embedding"
INV_FREQ = "rotary_emb.inv_freq"
BD3LM_BUFFERS = ("sampling_eps_min", "sampling_eps_max")  # outside the backbone
ROTARY_BASE = 10_000.0
FREQ_DIM = 256  # the DiT's frequency_embedding_size
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ConvertError(ValueError):
  """A checkpoint, tokenizer or output directory refused before anything is written."""


@dataclasses.dataclass(frozen=True)
class DiTSpec:
  """The DiT's sizes and switches, read from the tensors' shapes and config.json."""

  architecture: str
  prefix: str
  num_layers: int
  d_model: int
  num_heads: int
  ff_dim: int
  vocab_rows: int              # V + 1: the last row is the mask
  cond_dim: int                # 0: no adaLN and no timestep MLP (BD3-LM with adaln false)
  freq_dim: int
  time_conditioning: bool
  max_seq_len: int
  dropout: float
  block_size: Optional[int]    # BD3-LM's, for block sampling

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


# ----------------------------------------------------------------------------- reading


class Tensors:
  """Names, shapes and (on demand) values of a checkpoint's tensors: safetensors (one file, or
  a Hugging Face directory with model.safetensors or its sharded index) or numpy .npz."""

  def __init__(self, shapes: dict[str, tuple], dtypes: dict[str, str],
               read: Callable[[str], np.ndarray], files: list[str]):
    self.shapes, self.dtypes, self._read, self.files = shapes, dtypes, read, files

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self._read(name))


def _safetensors_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, s) for s in shards]
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  raise ConvertError(f"--checkpoint {path} holds no model.safetensors (nor a sharded "
                     "model.safetensors.index.json); point it at a .safetensors file or a "
                     "Hugging Face snapshot directory.")


def read_tensors(path: str) -> Tensors:
  """Opens a checkpoint without reading its values (the shapes are checked first)."""
  if not os.path.exists(path):
    raise ConvertError(f"--checkpoint {path} does not exist.")
  if path.endswith(TORCH_SUFFIXES):
    raise ConvertError(
        f"--checkpoint {path} is a PyTorch pickle, which is read only with PyTorch. Save its "
        "state dict as safetensors first (where PyTorch is installed): python -c \"import torch; "
        "from safetensors.torch import save_file; sd = torch.load('CKPT', map_location='cpu'); "
        "sd = sd.get('state_dict', sd); save_file({k: v.contiguous() for k, v in sd.items()}, "
        "'model.safetensors')\" (a Lightning .ckpt keeps its EMA apart, in ckpt['ema'])")
  if path.endswith(".npz"):
    arrays = np.load(path)
    shapes = {k: tuple(arrays[k].shape) for k in arrays.files}
    dtypes = {k: str(arrays[k].dtype) for k in arrays.files}
    return Tensors(shapes, dtypes, arrays.__getitem__, [path])
  try:
    from safetensors import safe_open
  except ImportError:
    raise ConvertError("reading safetensors needs the `safetensors` package: pip install "
                       "'mdlm[convert]' (or pip install safetensors).") from None
  shapes, dtypes, owner = {}, {}, {}
  for file in _safetensors_files(path):
    try:
      with safe_open(file, framework="numpy") as f:
        for k in f.keys():
          piece = f.get_slice(k)
          shapes[k], dtypes[k], owner[k] = tuple(piece.get_shape()), piece.get_dtype(), file
    except Exception as e:  # a truncated or foreign file
      raise ConvertError(f"{file} is not a readable safetensors file ({e}).") from None

  def read(name):
    with safe_open(owner[name], framework="numpy") as f:
      return f.get_tensor(name)

  return Tensors(shapes, dtypes, read, sorted(set(owner.values())))


def read_hf_config(checkpoint: str, config_path: Optional[str]) -> Optional[dict]:
  """config.json of a Hugging Face checkpoint: --config, else the one beside the weights."""
  if config_path is None:
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    config_path = os.path.join(folder or ".", "config.json")
    if not os.path.isfile(config_path):
      return None
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ConvertError(f"cannot read the checkpoint's config {config_path} ({e}).") from None
  if not isinstance(hf, dict):
    raise ConvertError(f"{config_path} is not a JSON object.")
  return hf


# ----------------------------------------------------------------------------- architecture


def _find_prefix(shapes: dict[str, tuple]) -> str:
  hits = [k for k in shapes if k == EMBEDDING or k.endswith("." + EMBEDDING)]
  if len(hits) != 1:
    some = ", ".join(sorted(shapes)[:6])
    raise ConvertError(
        "unknown architecture: this is not MDLM's DiT (the MDLM / BD3-LM checkpoints), which "
        f"has exactly one `{EMBEDDING}` tensor; found {len(hits)} among {len(shapes)} tensors "
        f"({some}{', ...' if len(shapes) > 6 else ''}). Convert an MDLM or BD3-LM checkpoint.")
  return hits[0][: -len(EMBEDDING)]


def _check_hf_architecture(hf: dict) -> str:
  kind = hf.get("model_type")
  if kind not in ARCHITECTURES:
    raise ConvertError(
        f"unknown architecture: config.json says model_type={kind!r}; this converter reads MDLM's "
        f"DiT (model_type {' or '.join(ARCHITECTURES)}). Convert an MDLM or BD3-LM checkpoint, "
        "or pass --config with the right config.json.")
  if hf.get("causal"):
    raise ConvertError("unknown architecture: config.json has causal: true (a causal DiT), which "
                       "is not an MDLM / BD3-LM denoiser; this converter reads the bidirectional "
                       "one.")
  return kind


def _num_heads(shapes, prefix, d_model, hf, num_heads) -> int:
  found = {}
  if hf and hf.get("n_heads"):
    found["config.json n_heads"] = int(hf["n_heads"])
  if num_heads:
    found["--num-heads"] = int(num_heads)
  inv = shapes.get(prefix + INV_FREQ)
  if inv is not None and len(inv) == 1 and inv[0] > 0:
    found[f"{prefix}{INV_FREQ} (head_dim {2 * inv[0]})"] = d_model // (2 * inv[0])
  if not found:
    raise ConvertError("cannot tell the number of attention heads (no config.json, no "
                       f"{INV_FREQ}): pass --num-heads (MDLM small: 12).")
  if len(set(found.values())) > 1:
    raise ConvertError(f"the number of heads disagrees: {found}; pass the right --num-heads.")
  heads = next(iter(found.values()))
  if heads < 1 or d_model % heads or (d_model // heads) % 2:
    raise ConvertError(f"{heads} heads do not split d_model={d_model} into even head sizes.")
  return heads


def infer_spec(shapes: dict[str, tuple], hf: Optional[dict], *, num_heads: Optional[int] = None,
               time_conditioning: Optional[bool] = None,
               max_seq_len: Optional[int] = None) -> DiTSpec:
  """The DiT's sizes from its tensors' shapes (and config.json, checked against them)."""
  hf = hf or {}
  architecture = _check_hf_architecture(hf) if hf else "mdlm"
  prefix = _find_prefix(shapes)
  emb = shapes[prefix + EMBEDDING]
  if len(emb) != 2:
    raise ConvertError(f"shape mismatch: {prefix}{EMBEDDING} has shape {emb}, expected "
                       "(V + 1, d_model).")
  rows, d = emb
  blocks = {int(m.group(1)) for k in shapes
            if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
  if not blocks:
    raise ConvertError(f"unknown architecture: no {prefix}blocks.<i>.* tensors.")
  mlp_in = shapes.get(f"{prefix}blocks.0.mlp.0.weight")
  sigma_in = shapes.get(f"{prefix}sigma_map.mlp.0.weight")
  ada = shapes.get(f"{prefix}blocks.0.adaLN_modulation.weight")
  adaln = any(re.search(r"(^|\.)(sigma_map|adaLN_modulation)\.", k) for k in shapes)
  cond = (sigma_in[0] if sigma_in and len(sigma_in) == 2 else
          ada[1] if ada and len(ada) == 2 else int(hf.get("cond_dim") or 128)) if adaln else 0
  tc = bool(hf.get("time_conditioning", False)) if time_conditioning is None else time_conditioning
  if tc and not adaln:
    raise ConvertError("time conditioning asked for, but the checkpoint has no adaLN / sigma_map "
                       "tensors (a DiT built with adaln: false); convert without it.")
  spec = DiTSpec(
      architecture=architecture, prefix=prefix, num_layers=max(blocks) + 1, d_model=d,
      num_heads=_num_heads(shapes, prefix, d, hf, num_heads),
      ff_dim=mlp_in[0] if mlp_in and len(mlp_in) == 2 else 4 * d, vocab_rows=rows,
      cond_dim=cond, freq_dim=sigma_in[1] if sigma_in and len(sigma_in) == 2 else FREQ_DIM,
      time_conditioning=tc, max_seq_len=int(max_seq_len or hf.get("model_length") or 1024),
      dropout=float(hf.get("dropout", 0.1)),
      block_size=int(hf["block_size"]) if architecture == "bd3lm" and "block_size" in hf else None)
  _check_hf_sizes(hf, spec)
  return spec


def _check_hf_sizes(hf: dict, spec: DiTSpec) -> None:
  pairs = [("hidden_dim", spec.d_model), ("n_blocks", spec.num_layers),
           ("vocab_size", spec.vocab_rows)]
  if spec.cond_dim:
    pairs.append(("cond_dim", spec.cond_dim))
  odd = [f"{k}={hf[k]} vs {v} in the tensors" for k, v in pairs if k in hf and hf[k] != v]
  if odd:
    raise ConvertError(f"config.json disagrees with the checkpoint's tensors ({'; '.join(odd)}); "
                       "pass --config with the checkpoint's own config.json.")


def expected_shapes(spec: DiTSpec) -> dict[str, tuple]:
  """Every tensor of the DiT with its shape (without the prefix); the rotary buffer apart."""
  d, f, c, rows = spec.d_model, spec.ff_dim, spec.cond_dim, spec.vocab_rows
  out = {EMBEDDING: (rows, d), "output_layer.norm_final.weight": (d,),
         "output_layer.linear.weight": (rows, d), "output_layer.linear.bias": (rows,)}
  if c:
    out.update({"sigma_map.mlp.0.weight": (c, spec.freq_dim), "sigma_map.mlp.0.bias": (c,),
                "sigma_map.mlp.2.weight": (c, c), "sigma_map.mlp.2.bias": (c,),
                "output_layer.adaLN_modulation.weight": (2 * d, c),
                "output_layer.adaLN_modulation.bias": (2 * d,)})
  for i in range(spec.num_layers):
    b = f"blocks.{i}."
    out.update({b + "norm1.weight": (d,), b + "attn_qkv.weight": (3 * d, d),
                b + "attn_out.weight": (d, d), b + "norm2.weight": (d,),
                b + "mlp.0.weight": (f, d), b + "mlp.0.bias": (f,), b + "mlp.2.weight": (d, f),
                b + "mlp.2.bias": (d,)})
    if c:
      out.update({b + "adaLN_modulation.weight": (6 * d, c), b + "adaLN_modulation.bias": (6 * d,)})
  return out


def _listed(names: list[str], limit: int = 12) -> str:
  more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_tensors(shapes: dict[str, tuple], spec: DiTSpec) -> None:
  """Refuses missing or unexpected tensors (listed) and shape mismatches (each named)."""
  want = {spec.prefix + k: v for k, v in expected_shapes(spec).items()}
  allowed = {spec.prefix + INV_FREQ, *BD3LM_BUFFERS}
  missing = sorted(set(want) - set(shapes))
  unexpected = sorted(set(shapes) - set(want) - allowed)
  wrong = [f"{k}: {tuple(shapes[k])} in the checkpoint, {want[k]} expected"
           for k in sorted(want) if k in shapes and tuple(shapes[k]) != want[k]]
  inv = shapes.get(spec.prefix + INV_FREQ)
  if inv is not None and tuple(inv) != (spec.head_dim // 2,):
    wrong.append(f"{spec.prefix}{INV_FREQ}: {tuple(inv)} in the checkpoint, "
                 f"{(spec.head_dim // 2,)} expected")
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listed(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_listed(unexpected)}")
  if wrong:
    problems.append(f"shape mismatches ({len(wrong)}): {_listed(wrong, 6)}")
  if problems:
    raise ConvertError(
        f"the checkpoint does not match MDLM's DiT with {spec.num_layers} layers, d_model "
        f"{spec.d_model}, {spec.num_heads} heads, cond_dim {spec.cond_dim}, vocabulary "
        f"{spec.vocab_rows} (read from its shapes): " + "; ".join(problems) +
        ". Convert the checkpoint as saved by MDLM / BD3-LM (a truncated or edited state dict "
        "cannot be imported).")


# ----------------------------------------------------------------------------- mapping


def model_config(spec: DiTSpec, vocab_size: int) -> config_lib.ModelConfig:
  """Our ModelConfig that computes exactly this DiT (vocab_size = V, without the mask)."""
  return config_lib.ModelConfig(
      name=f"{spec.architecture}-dit", kind="denoiser", num_layers=spec.num_layers,
      d_model=spec.d_model, num_heads=spec.num_heads, d_ff=spec.ff_dim, mlp="gelu",
      norm="layernorm", dropout=spec.dropout, time_conditioning=spec.time_conditioning,
      cond_dim=spec.cond_dim or 128, tie_embeddings=False, max_seq_len=spec.max_seq_len,
      vocab_size=vocab_size, rope_theta=ROTARY_BASE, norm_eps=1e-5, mlp_bias=True,
      head_bias=True, cond_bias=True, cond_freq_dim=spec.freq_dim, time_input="sigma",
      adaln_without_time=bool(spec.cond_dim) and not spec.time_conditioning).validate()


def to_params(tensors: Tensors, spec: DiTSpec) -> dict:
  """The DiT's tensors as our model's pure parameter dict (float32)."""
  d, n, h, c, v = spec.d_model, spec.num_heads, spec.head_dim, spec.cond_dim, spec.vocab_rows - 1

  def get(name):
    return np.ascontiguousarray(tensors.get(spec.prefix + name).astype(np.float32))

  def block(i):
    b = f"blocks.{i}."
    out = {"norm_attn": {"scale": get(b + "norm1.weight")},
           "attn": {"w_qkv": get(b + "attn_qkv.weight").T.reshape(d, 3, n, h),
                    "w_out": get(b + "attn_out.weight").T.reshape(n, h, d)},
           "norm_mlp": {"scale": get(b + "norm2.weight")},
           "mlp": {"w_in": get(b + "mlp.0.weight").T, "b_in": get(b + "mlp.0.bias"),
                   "w_out": get(b + "mlp.2.weight").T, "b_out": get(b + "mlp.2.bias")}}
    if c:
      out["ada"] = {"w": get(b + "adaLN_modulation.weight").T.reshape(c, 6, d),
                    "b": get(b + "adaLN_modulation.bias").reshape(6, d)}
    return out

  params = {"embed": get(EMBEDDING), "blocks": {i: block(i) for i in range(spec.num_layers)},
            "final_norm": {"scale": get("output_layer.norm_final.weight")},
            "head": get("output_layer.linear.weight")[:v].T,  # the mask's row: SUBS's -inf
            "head_bias": get("output_layer.linear.bias")[:v]}
  if c:
    params.update(
        cond_in=get("sigma_map.mlp.0.weight").T, cond_in_bias=get("sigma_map.mlp.0.bias"),
        cond_out=get("sigma_map.mlp.2.weight").T, cond_out_bias=get("sigma_map.mlp.2.bias"),
        final_ada={"w": get("output_layer.adaLN_modulation.weight").T.reshape(c, 2, d),
                   "b": get("output_layer.adaLN_modulation.bias").reshape(2, d)})
  return jax.tree.map(np.ascontiguousarray, params)


def _check_rotary(tensors: Tensors, spec: DiTSpec) -> None:
  name = spec.prefix + INV_FREQ
  if name not in tensors.shapes:
    return
  h = spec.head_dim
  want = 1.0 / ROTARY_BASE ** (np.arange(0, h, 2, dtype=np.float64) / h)
  got = tensors.get(name).astype(np.float64)
  if not np.allclose(got, want, rtol=1e-5, atol=0):
    raise ConvertError(f"{name} is not the rotary base {ROTARY_BASE:g} of MDLM's DiT (max "
                       f"relative difference {np.max(np.abs(got / want - 1)):.2e}).")


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64")


def _check_values(tensors: Tensors, spec: DiTSpec) -> None:
  bad = [f"{spec.prefix}{k}: {tensors.dtypes[spec.prefix + k]}" for k in expected_shapes(spec)
         if tensors.dtypes[spec.prefix + k] not in FLOAT_DTYPES]
  if bad:
    raise ConvertError(f"tensors of a non-float dtype ({_listed(bad, 6)}); convert a "
                       "floating-point checkpoint.")
  _check_rotary(tensors, spec)


# ----------------------------------------------------------------------------- writing


def check_output(out: str, overwrite: bool) -> str:
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConvertError(f"--out {out} exists and is not a directory; choose another --out.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ConvertError(f"--out {out} exists and is not empty; choose a new directory, or pass "
                       "--overwrite to replace it.")
  return out


# BD3-LM's mask-rate range before any clipping search: the full range above the schedule's eps.
BD3LM_FULL_RANGE = (1e-3, 1.0)


def objective_config(spec: DiTSpec, buffers: dict, seq_len: int) -> config_lib.ObjectiveConfig:
  """MDLM's objective; for a BD3-LM checkpoint, objective=bd3lm with its block size and, when its
  clipping search had narrowed the mask-rate range (the sampling_eps_min / max buffers), that
  range as objective.clip_min / clip_max, so that evaluate, sample (sampler=block) and fine-tuning
  continue the block objective it was trained with."""
  if spec.block_size is None:
    return config_lib.ObjectiveConfig(name="diffusion")
  if spec.time_conditioning:
    raise ConvertError("a BD3-LM checkpoint with time conditioning: objective=bd3lm draws one noise "
                       "level per block, which a per-sequence sigma cannot carry; convert with "
                       "--time-conditioning off.")
  if not 1 <= spec.block_size <= seq_len or seq_len % spec.block_size:
    raise ConvertError(f"config.json's block_size={spec.block_size} does not divide the run's "
                       f"sequence length {seq_len}; pass --max-seq-len as a multiple of it.")
  values = {"block_size": spec.block_size}
  if all(k in buffers for k in BD3LM_BUFFERS):
    lo, hi = (float(np.asarray(buffers[k]).reshape(-1)[0]) for k in BD3LM_BUFFERS)
    if not 0.0 <= lo < hi <= 1.0:
      raise ConvertError(f"the checkpoint's mask-rate range sampling_eps_min={lo:g}, "
                         f"sampling_eps_max={hi:g} is not a range in [0, 1].")
    if not np.allclose((lo, hi), BD3LM_FULL_RANGE, rtol=0, atol=1e-6):
      values.update(clip_min=lo, clip_max=hi)
  return config_lib.objective_configs()["bd3lm"](**values)


def run_config(model_cfg: config_lib.ModelConfig, vocab_size: int, spec: DiTSpec,
               buffers: dict) -> config_lib.Config:
  """The run's config.yaml: MDLM's objective (BD3-LM's for a BD3-LM checkpoint) and log-linear
  schedule (eps 1e-3), GPT-2's tokenizer (read from the run's tokenizer/), windows of the model's
  length."""
  seq_len = min(model_cfg.max_seq_len, 1024)
  cfg = config_lib.Config(
      model=model_cfg,
      data=config_lib.DataConfig(seq_len=seq_len),
      tokenizer=config_lib.TokenizerConfig(kind="gpt2", vocab_size=vocab_size, model_path=None),
      noise=config_lib.NoiseConfig(schedule="loglinear", eps=1e-3),
      objective=objective_config(spec, buffers, seq_len))
  return config_lib.validate(cfg)


def _trainer_state(cfg: config_lib.Config, params: dict):
  """The trainer's own initial state around the imported weights: params = EMA = the weights,
  a fresh optimizer state, step 0 (the layout `python -m mdlm.train` writes)."""
  mesh, rules = train.make_mesh(cfg, devices=jax.devices()[:1])
  spec = train.model_spec(cfg.model, mesh, rules)
  abstract = spec.abstract_params()
  got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
  want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract)
  if got != want:  # the mapping and the model disagree: a bug here, not bad input
    raise AssertionError(f"converted parameters do not fit the model: {got} vs {want}")
  placed = jax.device_put(params, spec.param_shardings)
  tx = train.make_optimizer(cfg.optim, cfg.train.steps)
  state, _ = train.init_state(spec, tx, cfg.train.seed, mesh, params=placed)
  return state


def _swap_in(tmp: str, out: str) -> None:
  old = None
  if os.path.isdir(out):
    old = f"{out}.old-{os.getpid()}"
    os.replace(out, old)
  os.replace(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_run(out: str, cfg: config_lib.Config, params: dict, tokenizer, record: dict) -> None:
  """Writes the run in a temporary directory beside `out`, then renames it into place."""
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    run = RunDir(tmp)
    tokenizer.save(run.tokenizer_dir)
    run.write_config(cfg)
    meta = {"step": 0, "objective": config_lib.objective(cfg), "phase": 0, "tokens": 0,
            checkpointing.IMPORTED: record["source"]}
    checkpointing.save_imported(run.checkpoints_dir, _trainer_state(cfg, params), meta)
    with open(run.convert_path, "w") as f:
      json.dump(record, f, indent=1)
    run.write_status(state="imported", step=0, message=f"imported from {record['source']}")
    _swap_in(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _sha256(files: list[str]) -> str:
  h = hashlib.sha256()
  for file in files:
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 24), b""):
        h.update(chunk)
  return h.hexdigest()


def _record(checkpoint, tensors: Tensors, spec: DiTSpec, tokenizer) -> dict:
  extras = {k: tensors.get(k).tolist() for k in BD3LM_BUFFERS if k in tensors.shapes}
  return {"source": os.path.abspath(checkpoint), "files": tensors.files,
          "sha256": _sha256(tensors.files), "architecture": spec.architecture,
          "spec": dataclasses.asdict(spec), "buffers": extras,
          "dropped": [f"{spec.prefix}output_layer.linear weight and bias row "
                      f"{spec.vocab_rows - 1} (the mask's logit; SUBS sets it to -inf)"],
          "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                        "mask_id": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                        "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                        "fingerprint": tokenizer.fingerprint}}


def import_dit(checkpoint: str, tokenizer_dir: str, out: str, *, config_path: Optional[str] = None,
               num_heads: Optional[int] = None, time_conditioning: Optional[bool] = None,
               max_seq_len: Optional[int] = None, overwrite: bool = False) -> dict:
  """Converts an MDLM / BD3-LM checkpoint into a run directory at `out`; returns convert.json.

  Refuses (ConvertError) before writing anything: an unknown architecture, missing or unexpected
  tensors, a shape mismatch, a tokenizer whose vocabulary is not the checkpoint's, a non-empty
  `out` (unless overwrite)."""
  out = check_output(out, overwrite)
  try:
    tokenizer = tokenizers.GPT2Tokenizer.from_directory(tokenizer_dir)
  except ValueError as e:
    raise ConvertError(f"--tokenizer: {e}") from None
  tensors = read_tensors(checkpoint)
  hf = read_hf_config(checkpoint, config_path)
  spec = infer_spec(tensors.shapes, hf, num_heads=num_heads, time_conditioning=time_conditioning,
                    max_seq_len=max_seq_len)
  check_tensors(tensors.shapes, spec)
  if spec.vocab_rows != tokenizer.vocab_size + 1:
    raise ConvertError(
        f"the checkpoint's vocabulary has {spec.vocab_rows} rows (V + 1 with the mask) but the "
        f"tokenizer at {tokenizer_dir} has V = {tokenizer.vocab_size}; pass the tokenizer the "
        "checkpoint was trained with (GPT-2's: V = 50257).")
  _check_values(tensors, spec)
  record = _record(checkpoint, tensors, spec, tokenizer)
  cfg = run_config(model_config(spec, tokenizer.vocab_size), tokenizer.vocab_size, spec,
                   record["buffers"])
  write_run(out, cfg, to_params(tensors, spec), tokenizer, record)
  return record


def finetune_overrides(model_cfg: config_lib.ModelConfig) -> list[str]:
  """The `model.*` overrides under which `python -m mdlm.train` builds this model whatever its
  model preset (to fine-tune it with train.init_from): every field but the free ones."""
  free = {"name", "vocab_size", "dtype", "param_dtype", "remat", "attention_impl"}
  return [f"model.{f.name}={getattr(model_cfg, f.name)}"
          for f in dataclasses.fields(config_lib.ModelConfig) if f.name not in free]


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mdlm.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="a .safetensors (or .npz) state dict, or a Hugging Face snapshot directory")
  p.add_argument("--tokenizer", required=True,
                 help="directory with GPT-2's vocab.json + merges.txt (or encoder.json + "
                      "vocab.bpe)")
  p.add_argument("--out", required=True, help="the run directory to write (new or empty)")
  p.add_argument("--config", default=None,
                 help="the checkpoint's config.json (default: the one beside it, if any)")
  p.add_argument("--num-heads", type=int, default=None,
                 help="attention heads, when no config.json or rotary buffer says")
  p.add_argument("--time-conditioning", choices=("auto", "on", "off"), default="auto",
                 help="auto: config.json's time_conditioning (absent: off, as MDLM trains)")
  p.add_argument("--max-seq-len", type=int, default=None,
                 help="default: config.json's model_length, else 1024")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  cli.setup_logging()
  tc = {"auto": None, "on": True, "off": False}[args.time_conditioning]
  try:
    record = import_dit(args.checkpoint, args.tokenizer, args.out, config_path=args.config,
                        num_heads=args.num_heads, time_conditioning=tc,
                        max_seq_len=args.max_seq_len, overwrite=args.overwrite)
  except ConvertError as e:
    print(f"mdlm.convert: {e} Nothing was written.", file=sys.stderr)
    return 2
  spec = record["spec"]
  out = os.path.abspath(args.out)
  model_cfg = RunDir(out).load_config().model
  print(f"imported {record['architecture']} DiT: {spec['num_layers']} layers, d_model "
        f"{spec['d_model']}, {spec['num_heads']} heads, V {record['tokenizer']['vocab_size']} "
        f"(+ mask {record['tokenizer']['mask_id']}), "
        f"{models.count_params(model_cfg)['total']:,} parameters -> {out}")
  print(f"evaluate:  python -m mdlm.evaluate run={out}")
  print(f"sample:    python -m mdlm.sample run={out}")
  print(f"fine-tune: python -m mdlm.train train.init_from={out} tokenizer.kind=gpt2 "
        + " ".join(finetune_overrides(model_cfg)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
