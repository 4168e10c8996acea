"""The transformer backbone: counts, presets, logical axes, grouped-query attention, causality,
padding, dtypes, bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from mdlm import models
from mdlm.config import ModelConfig
from mdlm.models import ar, presets
from tests.helpers import REPO

V = 37


def tiny(**kw):
  return presets.get("tiny", vocab_size=V, **kw)


def n_params(model):
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("kw", [{}, {"time_conditioning": True}, {"mlp": "swiglu"},
                                {"tie_embeddings": True, "norm": "rmsnorm"},
                                {"num_kv_heads": 2}, {"num_kv_heads": 1, "mlp": "swiglu"}])
def test_param_count_matches_closed_form(kw):
  cfg = tiny(**kw)
  assert n_params(models.build(cfg)) == presets.count_params(cfg)["total"]


def test_preset_counts():
  small = presets.count_params(presets.get("small"), vocab_size=50257)
  # 12 blocks of 12 d^2 (+ norms): ~85M; MDLM's ~92M also counts the adaLN layers (cond_dim 128).
  assert small["non_embedding"] == pytest.approx(85.0e6, rel=0.01)
  small_ada = presets.count_params(presets.get("small", time_conditioning=True), vocab_size=50257)
  assert small_ada["non_embedding"] == pytest.approx(92.3e6, rel=0.01)
  cfg = presets.get("cpu", vocab_size=8192)
  f = presets.flops_per_token(cfg, 256)
  m = presets.count_params(cfg)["matmul"]
  assert m == 8 * 12 * 512 ** 2 + 512 * 8192
  assert f["full"] == 6 * m + 12 * 8 * 256 * 512
  assert presets.custom(3, 96, 3).head_dim == 32
  # LLaDA-8B's published counts: 8.02B total, 6.98B without the embedding and head.
  llada = presets.count_params(presets.get("8b"), vocab_size=presets.LLADA_VOCAB - 1)
  assert llada["total"] == pytest.approx(8.02e9, abs=0.005e9)
  assert llada["non_embedding"] == pytest.approx(6.98e9, abs=0.005e9)
  assert llada["non_embedding"] == 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 4096
  # LLaDA-1B's: 1.49B total, 0.97B without the embedding and head (4 of 32 heads for K and V).
  llada = presets.count_params(presets.get("1b"), vocab_size=presets.LLADA_VOCAB - 1)
  assert llada["total"] == 1_487_241_216
  assert llada["non_embedding"] == 969_246_720
  assert round(llada["total"] / 1e9, 2) == 1.49 and round(llada["non_embedding"] / 1e9, 2) == 0.97
  attn = 2 * 2048**2 + 2 * 2048 * (4 * 64)  # queries and output; keys and values of 4 heads
  assert llada["non_embedding"] == 22 * (attn + 3 * 2048 * 5634 + 2 * 2048) + 2048


def test_preset_yamls_match_the_presets():
  """configs/model/<name>.yaml sets the same ModelConfig as presets.PRESETS[name]."""
  for name, preset in presets.PRESETS.items():
    path = os.path.join(REPO, "configs", "model", f"{name}.yaml")
    assert os.path.exists(path), path
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(path)))
    assert cfg == preset, name


def test_every_parameter_has_logical_axes():
  for cfg in (tiny(time_conditioning=True, mlp="swiglu"), tiny(kind="ar"), tiny(num_kv_heads=2)):
    specs = nnx.get_partition_spec(nnx.state(models.build(cfg), nnx.Param))
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = jax.tree.leaves(nnx.state(models.build(cfg), nnx.Param))
    assert len(leaves) == len(params)
    for spec, p in zip(leaves, params):
      assert len(spec) == np.ndim(p) and all(isinstance(a, str) for a in spec), spec


def _as_multi_head(gqa, kv_head_of):
  """The multi-head model with `gqa`'s parameters, query head i reading key/value head
  kv_head_of[i] (its key and value projections copied into w_qkv's head i)."""
  mha = models.build(gqa.cfg.replace(num_kv_heads=0), seed=1)
  params = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
  for block in params["blocks"].values():
    attn = block["attn"]
    w_q, w_kv = attn.pop("w_q"), attn.pop("w_kv")
    attn["w_qkv"] = jnp.stack([w_q, w_kv[:, 0, kv_head_of], w_kv[:, 1, kv_head_of]], axis=1)
  state = nnx.state(mha, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(mha, state)
  return mha


@pytest.mark.parametrize("kind", ["denoiser", "ar"])
def test_grouped_query_attention_is_repeated_key_value_heads(kind):
  """4 query heads over 2 key/value heads equal multi-head attention whose head i has the keys
  and values of kv head i // 2; the KV-cached AR decoder agrees too."""
  gqa = models.build(tiny(kind=kind, num_kv_heads=2, mlp="swiglu", norm="rmsnorm"))
  attn = gqa.blocks[0].attn
  assert attn.w_q.shape == (64, 4, 16) and attn.w_kv.shape == (64, 2, 2, 16)
  assert not hasattr(attn, "w_qkv")
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, V)
  logits = gqa(tokens)
  mha = _as_multi_head(gqa, np.arange(4) // 2)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(mha(tokens)), atol=1e-5, rtol=1e-5)
  # The grouping matters: heads (0, 1, 0, 1) instead of (0, 0, 1, 1) compute something else.
  other = _as_multi_head(gqa, np.arange(4) % 2)
  assert not np.allclose(np.asarray(logits), np.asarray(other(tokens)), atol=1e-3)
  if kind == "ar":
    assert ar.init_cache(gqa, 2, 16).k[0].shape == (2, 16, 2, 16)  # kv_heads heads cached
    np.testing.assert_allclose(np.asarray(ar.cached_logits(gqa, tokens, prompt_len=5)),
                               np.asarray(logits), atol=1e-4, rtol=1e-4)


def test_num_kv_heads_equal_to_num_heads_is_multi_head_attention():
  """num_kv_heads=num_heads spelled out is the default multi-head model: one w_qkv, drawn the
  same way, so its checkpoints load either way."""
  a = nnx.to_pure_dict(nnx.state(models.build(tiny()), nnx.Param))
  b = nnx.to_pure_dict(nnx.state(models.build(tiny(num_kv_heads=4)), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert a["blocks"][0]["attn"]["w_qkv"].shape == (64, 3, 4, 16)


def test_ar_model_is_causal_and_denoiser_is_not():
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, V)
  changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % V)
  ar = models.build(tiny(kind="ar"))
  a, b = ar(tokens), ar(changed)
  np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
  assert not np.allclose(a[:, 9:], b[:, 9:])
  den = models.build(tiny())
  assert not np.allclose(den(tokens)[:, :9], den(changed)[:, :9])


def test_padding_mask_hides_padded_keys():
  model = models.build(tiny())
  tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, V)
  token_mask = jnp.arange(12)[None] < 8
  other = tokens.at[:, 8:].set(0)
  a = model(tokens, token_mask_BxL=token_mask)
  b = model(other, token_mask_BxL=token_mask)
  np.testing.assert_allclose(np.asarray(a[:, :8]), np.asarray(b[:, :8]), atol=1e-5)
  # Without the mask the padding is visible.
  assert not np.allclose(model(tokens)[:, :8], model(other)[:, :8], atol=1e-5)


def test_mask_token_has_own_embedding_row():
  model = models.build(tiny())
  assert model.embed.shape == (V + 1, 64) and model.mask_id == V
  logits = model(jnp.full((1, 4), V, jnp.int32))
  assert logits.shape == (1, 4, V)


def test_bf16_compute_matches_float32():
  cfg = tiny(mlp="swiglu")
  m32 = models.build(cfg)
  m16 = models.build(cfg.replace(dtype="bfloat16"))
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, V + 1)
  a, b = m32(tokens), m16(tokens)
  assert a.dtype == jnp.float32 and b.dtype == jnp.float32
  pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
  assert float(jnp.max(jnp.abs(pa - pb))) < 0.05
  assert float(jnp.mean(jnp.abs(a - b))) < 0.05 * float(jnp.mean(jnp.abs(a)))


def test_bf16_gradients_match_float32():
  """bf16 compute, float32 parameters: the gradients of the whole model (the custom backward pass
  of the mixed-precision GEMMs included) agree with float32's to bf16 precision, and arrive as
  float32."""
  cfg = tiny(mlp="swiglu")
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, V + 1)

  def grads(dtype):
    model = models.build(cfg.replace(dtype=dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens))[..., 0])
    return jax.jit(jax.grad(loss))(params)

  g32, g16 = grads("float32"), grads("bfloat16")
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(a))) + 1e-12
    assert float(jnp.max(jnp.abs(a - b))) < 0.05 * scale, a.shape


@pytest.mark.parametrize("shape", [(48, 32), (40, 24)])
def test_mixed_precision_dense(shape):
  """dense() with bf16 activations against the plain formulation: the same value, gradients from
  GEMMs on row-major copies (the CPU path; a width that 16 does not divide takes the plain
  copy), w's gradient in float32 unrounded to bf16."""
  from mdlm.models.transformer import _row_major_transpose, dense
  m, k = shape
  x = jax.random.normal(jax.random.key(0), (m, k)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (k, 3, 8)) / k
  np.testing.assert_array_equal(jax.jit(_row_major_transpose)(x), x.T)

  def via_dense(x, w):
    return jnp.sum(jnp.sin(dense(x, w, preferred_element_type=jnp.float32)))

  def reference(x, w):  # the same products in float32 (bf16 inputs are exact in float32)
    x32, w16 = x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
    return jnp.sum(jnp.sin(jnp.einsum("mk,kab->mab", x32, w16)))

  np.testing.assert_allclose(jax.jit(via_dense)(x, w), reference(x, w), rtol=1e-5)
  dx, dw = jax.jit(jax.grad(via_dense, (0, 1)))(x, w)
  rx, rw = jax.grad(reference, (0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(dx.astype(jnp.float32), rx.astype(jnp.float32), rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(rx))))
  # dw's only rounding is the cotangent's cast to bf16 (2^-9 relative); it is summed in float32.
  np.testing.assert_allclose(dw, rw, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(rw))))


def test_time_conditioning_adaln_zero():
  model = models.build(tiny(time_conditioning=True))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, V)
  # adaLN-zero: at initialisation the conditioning has no effect ...
  np.testing.assert_allclose(model(tokens, jnp.asarray([0.1, 0.1])),
                             model(tokens, jnp.asarray([0.9, 0.9])), atol=1e-6)
  # ... but it is wired in: perturbing the modulation makes the output depend on it.
  model.blocks[0].ada.w[...] = jax.random.normal(jax.random.key(2), model.blocks[0].ada.w.shape)
  assert not np.allclose(model(tokens, jnp.asarray([0.1, 0.1])),
                         model(tokens, jnp.asarray([0.9, 0.9])), atol=1e-4)
  with pytest.raises(ValueError, match="time-conditioned"):
    model(tokens)


def test_dropout_only_with_key():
  model = models.build(tiny(dropout=0.5))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, V)
  np.testing.assert_array_equal(model(tokens), model(tokens))
  k = jax.random.key(3)
  np.testing.assert_array_equal(model(tokens, dropout_key=k), model(tokens, dropout_key=k))
  assert not np.allclose(model(tokens, dropout_key=k), model(tokens))


def test_tied_embeddings_share_the_table():
  model = models.build(tiny(tie_embeddings=True))
  assert model.head is None
  h = jax.random.normal(jax.random.key(0), (1, 3, 64))
  np.testing.assert_allclose(model.logits(h), h @ model.embed[...][:V].T, rtol=1e-5, atol=1e-5)


def test_bad_input():
  model = models.build(tiny())
  with pytest.raises(ValueError, match="max_seq_len"):
    model(jnp.zeros((1, 129), jnp.int32))
  with pytest.raises(ValueError, match="token ids"):
    model(jnp.full((1, 4), V + 1, jnp.int32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="divisible"):
    presets.custom(2, 66, 4)
  with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
    tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="num_kv_heads must be >= 0"):
    tiny(num_kv_heads=-1)
  with pytest.raises(ValueError, match="Unknown model preset"):
    presets.get("huge")
  with pytest.raises(ValueError, match="vocab_size"):
    models.build(presets.get("tiny"))
