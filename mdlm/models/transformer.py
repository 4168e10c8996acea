"""Pre-norm rotary transformer blocks in Flax NNX, shared by the denoiser and the AR baseline.

Every parameter carries logical axis names (metadata `sharding_names`), so the trainer shards the
model over a (data, fsdp, tensor) mesh with a rules table alone (see `mdlm.sharding`). Parameters
are float32 unless `cfg.param_dtype` says otherwise; activations use `cfg.dtype`; the output
logits are float32. `cfg.remat` and `cfg.scan_layers` trade memory and compile time for nothing
in the numbers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdlm import sharding
from mdlm.config import ModelConfig

# Logical axis names used by the parameters.
EMBED, MLP, HEADS, KV, VOCAB, QKV, COND, MOD, LAYERS = (
    "embed", "mlp", "heads", "kv", "vocab", "qkv", "cond", "modulation", "layers")


def _param(rngs: nnx.Rngs, init, shape, axes):
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, jnp.float32), sharding_names=axes,
                   eager_sharding=False)


def _normal(std):
  return jax.nn.initializers.normal(std)


def _dense_init(fan_in):
  return jax.nn.initializers.truncated_normal(1.0 / math.sqrt(fan_in))


def dense(x, w, in_ndim: int = 1, preferred_element_type=None):
  """Contracts the last `in_ndim` axes of x with the first `in_ndim` axes of w, as one 2-D GEMM.

  The operands are flattened to [tokens, fan_in] @ [fan_in, fan_out] (free reshapes) so that the
  backward pass is two plain GEMMs: with a 3-D einsum the weight gradient contracts over
  (batch, length) and XLA's CPU backend then materialises transposed copies of the activations.
  Flattening w's output axes keeps a sharded axis partitioned only if it is the major one, so
  callers pass one (fan_in, heads, head_dim) or (fan_in, mlp) slice at a time.

  w is the float32 parameter. With float32 activations this is a plain float32 GEMM. With
  low-precision (bf16) activations, w is cast to their dtype and the GEMM accumulates in float32
  (`_mixed_dot`); the result is cast back to x's dtype unless `preferred_element_type` asks for
  another (the output head asks for float32 logits).
  """
  lead, fan_in = x.shape[: x.ndim - in_ndim], x.shape[x.ndim - in_ndim:]
  out = w.shape[in_ndim:]
  x2, w2 = x.reshape(-1, math.prod(fan_in)), w.reshape(math.prod(fan_in), -1)
  if x.dtype == jnp.float32:
    y = jnp.dot(x2, w2.astype(jnp.float32), preferred_element_type=preferred_element_type)
  else:
    y = _mixed_dot(x2, w2, jnp.dtype(preferred_element_type or x.dtype), jnp.dtype(w2.dtype))
  return y.reshape(*lead, *out)


def _row_major_transpose(a_MxN):
  """a.T as a row-major copy on CPU (a plain transpose elsewhere).

  XLA folds a transpose into the GEMM that reads it (a transposed operand), and its CPU backend
  runs bf16 GEMMs with a transposed operand at about half the rate of row-major ones: a backward
  pass whose two GEMMs both read a transposed operand loses the whole gain of bf16. A transpose
  through a reshape cannot be folded, and the copy costs a few percent of the GEMM it feeds.
  """
  m, n = a_MxN.shape

  def copy(a):
    split = 16 if n % 16 == 0 else 1
    return jnp.transpose(a.reshape(m, n // split, split), (1, 2, 0)).reshape(n, m)

  return jax.lax.platform_dependent(a_MxN, cpu=copy, default=jnp.transpose)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_dot(x_MxK, w_KxN, out_dtype, w_dtype):
  """x @ w in x's (low-precision) dtype with float32 accumulation, cast to out_dtype.

  The custom backward pass computes both gradients as low-precision GEMMs with float32
  accumulation on row-major operands, and returns w's gradient in w's own dtype (float32 for a
  parameter) straight from the float32 accumulator, so it is never rounded to bf16."""
  del w_dtype
  return jnp.dot(x_MxK, w_KxN.astype(x_MxK.dtype),
                 preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_dot_fwd(x_MxK, w_KxN, out_dtype, w_dtype):
  w_lo = w_KxN.astype(x_MxK.dtype)
  return _mixed_dot(x_MxK, w_KxN, out_dtype, w_dtype), (x_MxK, w_lo)


def _mixed_dot_bwd(out_dtype, w_dtype, residuals, dy_MxN):
  x_MxK, w_lo_KxN = residuals
  dy_MxN = dy_MxN.astype(x_MxK.dtype)
  dx_MxK = jnp.dot(dy_MxN, _row_major_transpose(w_lo_KxN), preferred_element_type=jnp.float32)
  dw_KxN = jnp.dot(_row_major_transpose(x_MxK), dy_MxN, preferred_element_type=jnp.float32)
  return dx_MxK.astype(x_MxK.dtype), dw_KxN.astype(w_dtype)


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


class Norm(nnx.Module):
  """LayerNorm (no bias, as in MDLM's DiT) or RMSNorm, computed in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.norm
    self.eps = cfg.norm_eps
    self.scale = _param(rngs, jax.nn.initializers.ones, (cfg.d_model,), (EMBED,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rotary(x_BxLxNxH, positions_L, theta):
  """Rotary position embedding (Su et al. 2021, "RoFormer"), rotate-half form, in float32."""
  half = x_BxLxNxH.shape[-1] // 2
  freq_H = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_LxH = positions_L.astype(jnp.float32)[:, None] * freq_H[None, :]
  sin, cos = jnp.sin(angle_LxH)[:, None, :], jnp.cos(angle_LxH)[:, None, :]
  x32 = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def rotary_2d(x_BxLxNxH, positions_BxLx2, theta):
  """Two-dimensional rotary embedding over per-row positions (p, s) (ExLM, mdlm.models.exlm):
  the first half of each head is rotated by p, the second half by s, each half in the
  rotate-half form with its own H/4 frequencies, so q.k depends on (p - p', s - s') only."""
  half = x_BxLxNxH.shape[-1] // 2
  quarter = half // 2
  freq_Q = theta ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
  x32 = x_BxLxNxH.astype(jnp.float32)
  parts = []
  for axis, x_half in enumerate((x32[..., :half], x32[..., half:])):
    angle_BxLxQ = positions_BxLx2[..., axis].astype(jnp.float32)[..., None] * freq_Q
    sin, cos = jnp.sin(angle_BxLxQ)[:, :, None, :], jnp.cos(angle_BxLxQ)[:, :, None, :]
    x1, x2 = x_half[..., :quarter], x_half[..., quarter:]
    parts += [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  return jnp.concatenate(parts, axis=-1).astype(x_BxLxNxH.dtype)


def dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention (one `w_qkv`), or grouped-query attention (Ainslie et al. 2023, "GQA")
  when cfg.kv_heads < cfg.num_heads: `w_q` for the num_heads query heads and `w_kv` for the
  kv_heads key/value heads, query head i reading key/value head i // (num_heads / kv_heads)
  (jax.nn.dot_product_attention's grouping).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.kv_heads
    if k == n:
      self.w_qkv = _param(rngs, _dense_init(d), (d, 3, n, h), (EMBED, QKV, HEADS, KV))
    else:
      self.w_q = _param(rngs, _dense_init(d), (d, n, h), (EMBED, HEADS, KV))
      self.w_kv = _param(rngs, _dense_init(d), (d, 2, k, h), (EMBED, QKV, HEADS, KV))
    self.w_out = _param(rngs, _dense_init(d), (n, h, d), (HEADS, KV, EMBED))

  def qkv(self, x_BxLxD, positions_L):
    """q [B, L, num_heads, H] and k, v [B, L, kv_heads, H], rotary applied to q and k."""
    # One GEMM per projection: flattening (3, n, h) into one output dimension would put the
    # (tensor-sharded) heads axis inside it and force a resharding of the weight.
    if self.cfg.kv_heads == self.cfg.num_heads:
      w_Dx3xNxH = self.w_qkv[...]
      q, k, v = (dense(x_BxLxD, w_Dx3xNxH[:, i]) for i in range(3))
    else:
      w_Dx2xKxH = self.w_kv[...]
      q = dense(x_BxLxD, self.w_q[...])
      k, v = (dense(x_BxLxD, w_Dx2xKxH[:, i]) for i in range(2))
    theta = self.cfg.rope_theta
    rope = rotary if positions_L.ndim == 1 else rotary_2d  # [L], or [B, L, 2] (ExLM)
    return rope(q, positions_L, theta), rope(k, positions_L, theta), v

  def attend(self, q, k, v, mask, is_causal):
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=self.cfg.attention_impl)
    return dense(out, self.w_out[...], in_ndim=2)

  def __call__(self, x_BxLxD, positions_L, mask, causal: bool):
    q, k, v = self.qkv(x_BxLxD, positions_L)
    return self.attend(q, k, v, mask, causal)


class FeedForward(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    d, f = cfg.d_model, cfg.ff_dim
    if cfg.mlp == "swiglu":
      self.w_in = _param(rngs, _dense_init(d), (d, 2, f), (EMBED, QKV, MLP))
    else:
      self.w_in = _param(rngs, _dense_init(d), (d, f), (EMBED, MLP))
    self.w_out = _param(rngs, _dense_init(f), (f, d), (MLP, EMBED))
    if cfg.mlp_bias:  # MDLM's DiT (mdlm.convert)
      zeros = jax.nn.initializers.zeros
      shape, axes = ((2, f), (QKV, MLP)) if cfg.mlp == "swiglu" else ((f,), (MLP,))
      self.b_in = _param(rngs, zeros, shape, axes)
      self.b_out = _param(rngs, zeros, (d,), (EMBED,))
    else:
      self.b_in = self.b_out = None

  def __call__(self, x_BxLxD):
    if self.kind == "swiglu":
      # Two GEMMs rather than one over the flattened (2, f): see Attention.qkv.
      w_Dx2xF = self.w_in[...]
      up = [dense(x_BxLxD, w_Dx2xF[:, i]) for i in range(2)]
      if self.b_in is not None:
        up = [u + self.b_in[...][i].astype(u.dtype) for i, u in enumerate(up)]
      h = jax.nn.silu(up[0]) * up[1]
    else:
      up = dense(x_BxLxD, self.w_in[...])
      if self.b_in is not None:
        up = up + self.b_in[...].astype(up.dtype)
      h = jax.nn.gelu(up, approximate=True)
    out = dense(h, self.w_out[...])
    return out if self.b_out is None else out + self.b_out[...].astype(out.dtype)


class AdaLN(nnx.Module):
  """adaLN-zero modulation (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

  Maps the conditioning vector to `count` d_model-vectors; zero-initialised, so a freshly built
  conditioned block is the identity map, exactly as DiT's adaLN-zero.
  """

  def __init__(self, cfg: ModelConfig, count: int, *, rngs: nnx.Rngs):
    self.w = _param(rngs, jax.nn.initializers.zeros, (cfg.cond_dim, count, cfg.d_model),
                    (COND, MOD, EMBED))
    self.b = _param(rngs, jax.nn.initializers.zeros, (count, cfg.d_model), (MOD, EMBED))

  def __call__(self, cond_BxC):
    mod = jnp.einsum("bc,ckd->kbd", jax.nn.silu(cond_BxC), self.w[...]) + self.b[...][:, None]
    return mod[:, :, None, :]  # [count, B, 1, D]


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.norm_attn = Norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm_mlp = Norm(cfg, rngs=rngs)
    self.mlp = FeedForward(cfg, rngs=rngs)
    self.ada = AdaLN(cfg, 6, rngs=rngs) if cfg.conditioned else None

  def __call__(self, x, positions_L, mask, cond_BxC=None, dropout_key=None, causal=None):
    rate = self.cfg.dropout
    causal = self.cfg.causal if causal is None else causal
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    if self.ada is None:
      x = x + dropout(self.attn(self.norm_attn(x), positions_L, mask, causal), rate, keys[0])
      return x + dropout(self.mlp(self.norm_mlp(x)), rate, keys[1])
    shift1, scale1, gate1, shift2, scale2, gate2 = (m.astype(x.dtype) for m in self.ada(cond_BxC))
    h = self.norm_attn(x) * (1 + scale1) + shift1
    x = x + gate1 * dropout(self.attn(h, positions_L, mask, causal), rate, keys[0])
    h = self.norm_mlp(x) * (1 + scale2) + shift2
    return x + gate2 * dropout(self.mlp(h), rate, keys[1])


# jax.checkpoint's policy per ModelConfig.remat: what the backward pass may keep ("full": nothing,
# the block is recomputed from its input).
REMAT_POLICIES = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs):
  """cfg.num_layers blocks as one Block whose parameters carry a leading "layers" axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def build(rngs):
    return Block(cfg, rngs=rngs)

  return build(rngs)


def timestep_embedding(noise_B, dim, max_period=10000.0):
  """Sinusoidal features of the noise level (scaled to [0, 1000] like DiT's timesteps)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * noise_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sigma_embedding(noise_B, dim, max_period=10000.0):
  """MDLM's DiT's time features: the same sinusoids (cos, then sin) of sigma = -log alpha =
  -log(1 - noise level), unscaled. The noise level is capped just below 1 (sigma <= 16.6), where
  sigma is infinite; MDLM's schedules stop at alpha = 1e-3 (sigma 6.9)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  sigma_B = -jnp.log1p(-jnp.minimum(noise_B.astype(jnp.float32), np.float32(1.0 - 2.0 ** -24)))
  args = sigma_B[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Transformer(nnx.Module):
  """Token embedding (V + 1 rows: row V is the mask), L blocks, final norm, V-way output head.

  __call__(tokens, noise_level=None) -> float32 logits [B, L, V]. The denoiser attends in both
  directions; the AR model is causal; `causal=True/False` overrides the kind (the same parameters
  train under both attentions in AntLM-style phases). `noise_level` (the mask probability
  1 - alpha(t), a schedule-free quantity) is read only when cfg.time_conditioning is set.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    if cfg.vocab_size < 1:
      raise ValueError("ModelConfig.vocab_size must be set (>= 1) before building the model.")
    self.cfg = cfg
    d, v = cfg.d_model, cfg.vocab_size
    self.embed = _param(rngs, _normal(1.0), (v + 1, d), (VOCAB, EMBED))
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg, rngs=rngs)
    if cfg.conditioned:
      c, f = cfg.cond_dim, cfg.freq_dim
      self.cond_in = _param(rngs, _dense_init(f), (f, c), (COND, "cond_hidden"))
      self.cond_out = _param(rngs, _dense_init(c), (c, c), (COND, "cond_hidden"))
      self.final_ada = AdaLN(cfg, 2, rngs=rngs)
    else:
      self.cond_in = self.cond_out = self.final_ada = None
    if cfg.conditioned and cfg.cond_bias:  # MDLM's DiT (mdlm.convert)
      zeros = jax.nn.initializers.zeros
      self.cond_in_bias = _param(rngs, zeros, (cfg.cond_dim,), ("cond_hidden",))
      self.cond_out_bias = _param(rngs, zeros, (cfg.cond_dim,), ("cond_hidden",))
    else:
      self.cond_in_bias = self.cond_out_bias = None
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = _param(rngs, _dense_init(d), (d, v), (EMBED, VOCAB))
    if cfg.head_bias:  # MDLM's DiT (mdlm.convert)
      self.head_bias = _param(rngs, jax.nn.initializers.zeros, (v,), (VOCAB,))
    else:
      self.head_bias = None
    if cfg.param_dtype != "float32":  # drawn in float32 (the same values, rounded)
      dtype = jnp.dtype(cfg.param_dtype)
      for _, var in nnx.iter_graph(self):
        if isinstance(var, nnx.Param):
          var.set_value(var.get_value().astype(dtype))

  @property
  def mask_id(self) -> int:
    return self.cfg.vocab_size

  def condition(self, noise_level_B):
    if self.cfg.time_input == "sigma":
      c = sigma_embedding(noise_level_B, self.cfg.freq_dim)
    else:
      c = timestep_embedding(noise_level_B, self.cfg.freq_dim)
    if self.cond_in_bias is None:
      return jax.nn.silu(c @ self.cond_in[...]) @ self.cond_out[...]
    h = jax.nn.silu(c @ self.cond_in[...] + self.cond_in_bias[...])
    return h @ self.cond_out[...] + self.cond_out_bias[...]

  def conditioning(self, noise_level_B, batch_size: int):
    """The conditioning vector [B, cond_dim] of the blocks' adaLN, or None without adaLN: of the
    noise level when time-conditioned, of the time 0 under cfg.adaln_without_time."""
    if self.cfg.time_conditioning:
      if noise_level_B is None:
        raise ValueError("This model is time-conditioned: pass noise_level_B.")
      return self.condition(jnp.broadcast_to(noise_level_B, (batch_size,)))
    if self.cfg.adaln_without_time:
      return self.condition(jnp.zeros((batch_size,), jnp.float32))
    return None

  def embed_tokens(self, tokens_BxL):
    dtype = jnp.dtype(self.cfg.dtype)
    return jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dtype)

  def output_weights(self):
    if self.head is None:
      return self.embed[...][: self.cfg.vocab_size].T
    return self.head[...]

  def logits(self, hidden_BxLxD):
    """Output head in the compute dtype with float32 accumulation and float32 result."""
    logits = dense(hidden_BxLxD, self.output_weights(), preferred_element_type=jnp.float32)
    return logits if self.head_bias is None else logits + self.head_bias[...].astype(jnp.float32)

  def final_hidden(self, hidden_BxLxD, cond_BxC=None):
    h = self.final_norm(hidden_BxLxD)
    if cond_BxC is not None:
      shift, scale = (m.astype(h.dtype) for m in self.final_ada(cond_BxC))
      h = h * (1 + scale) + shift
    return h

  def __call__(self, tokens_BxL, noise_level_B=None, *, token_mask_BxL=None, dropout_key=None,
               causal=None):
    return self.logits(self.hidden_states(tokens_BxL, noise_level_B,
                                          token_mask_BxL=token_mask_BxL, dropout_key=dropout_key,
                                          causal=causal))

  def hidden_states(self, tokens_BxL, noise_level_B=None, *, token_mask_BxL=None,
                    dropout_key=None, causal=None, positions=None, attention_mask=None):
    """The final-norm states [B, L, D] that the output head reads (`logits` maps them to
    [B, L, V]); a sampler that needs predictions at a few positions applies the head there only.
    positions: None (0..L-1), or per-row 2D rotary positions [B, L, 2] (ExLM's expanded input,
    mdlm.models.exlm, which checks the original length against max_seq_len itself), or rotary
    positions [L] (block diffusion's [x_t, x_0] input, mdlm.objectives.block: 0..L/2-1 twice).
    attention_mask: None, or a boolean [B or 1, L, L] (query, key) mask, ANDed with the padding
    mask and passed to jax.nn.dot_product_attention (block diffusion's block-causal mask)."""
    tokens_BxL = jnp.asarray(tokens_BxL)
    if tokens_BxL.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, length], got {tokens_BxL.shape}.")
    length = tokens_BxL.shape[1]
    if positions is None and length > self.cfg.max_seq_len:
      raise ValueError(
          f"Sequence length {length} exceeds the model's max_seq_len={self.cfg.max_seq_len}; "
          "shorten data.seq_len or build the model with a larger max_seq_len.")
    if not isinstance(tokens_BxL, jax.core.Tracer) and tokens_BxL.size:
      host = np.asarray(tokens_BxL)  # numpy: no trace even when closed over inside jit
      lo, hi = int(host.min()), int(host.max())
      if lo < 0 or hi > self.cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}] (V real tokens + the "
                         f"mask); got ids in [{lo}, {hi}].")
    cond = self.conditioning(noise_level_B, tokens_BxL.shape[0])
    mask = None
    if token_mask_BxL is not None:
      mask = jnp.asarray(token_mask_BxL, bool)[:, None, None, :]
    if attention_mask is not None:
      full = jnp.asarray(attention_mask, bool)[:, None]  # [B or 1, 1, L, L]
      mask = full if mask is None else mask & full
    positions_L = jnp.arange(length) if positions is None else jnp.asarray(positions)
    x = sharding.constrain_batch(self.embed_tokens(tokens_BxL))

    def apply_block(block, x, key):
      return sharding.constrain_batch(block(x, positions_L, mask, cond, key, causal))

    if self.cfg.remat != "none":
      apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.cfg.remat])
    layer_keys = None
    if dropout_key is not None:
      layer_keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(
          jnp.arange(self.cfg.num_layers))
    if self.cfg.scan_layers:
      scan = nnx.scan(apply_block, in_axes=(0, nnx.Carry, None if layer_keys is None else 0),
                      out_axes=nnx.Carry)
      x = scan(self.blocks, x, layer_keys)
    else:
      for i, block in enumerate(self.blocks):
        x = apply_block(block, x, None if layer_keys is None else layer_keys[i])
    return self.final_hidden(x, cond)

  def layers(self) -> list:
    """The blocks in order, as separate modules also when they are stacked (scan_layers): for
    code that runs them one at a time (the AR model's KV-cached decoding)."""
    if not self.cfg.scan_layers:
      return list(self.blocks)
    graphdef, state = nnx.split(self.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.cfg.num_layers)]
