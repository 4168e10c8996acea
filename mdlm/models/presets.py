"""Size presets and the parameter / FLOP accounting that the trainer and scaling tools share.

Conventions:
- N_total counts every parameter. N_non_embedding leaves out the token embedding and the output
  head (the convention of Kaplan et al. 2020 and SMDM). N_matmul counts the parameters used in
  matrix multiplies per token: every weight matrix, the output head included, the embedding
  lookup excluded.
- Training FLOPs per token: "6N" = 6 N_non_embedding (the scaling-law convention), and "full" =
  6 N_matmul + 12 n_layers L d (forward + backward of the QK^T and AV products, counting a
  multiply-add as 2 FLOPs).
"""

from __future__ import annotations

import dataclasses

from mdlm.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # For tests on a 2-core CPU.
    "tiny": ModelConfig(name="tiny", num_layers=2, d_model=64, num_heads=4, max_seq_len=128),
    # The CPU-sized model of the training benchmark and the default embedded run.
    "cpu": ModelConfig(name="cpu", num_layers=8, d_model=512, num_heads=8, max_seq_len=256),
    # MDLM's "small" (a GPT-2-small-sized DiT): 12 layers, d=768, 12 heads.
    "small": ModelConfig(name="small", num_layers=12, d_model=768, num_heads=12, max_seq_len=1024,
                         dropout=0.1),
    # 24 layers, d=1024, 16 heads.
    "medium": ModelConfig(name="medium", num_layers=24, d_model=1024, num_heads=16,
                          max_seq_len=1024, dropout=0.1),
    # LLaDA-8B's shape (Nie et al. 2025, "Large Language Diffusion Models", Table 5): 32 layers,
    # d=4096, 32 heads (no grouped KV), SwiGLU FFN 12,288, RMSNorm, RoPE, untied embedding and
    # head, 4,096-token context. With its vocabulary (LLADA_VOCAB ids, the mask among them:
    # vocab_size=LLADA_VOCAB - 1 here, as mdlm adds the mask row) the counts are the paper's
    # 8.02B total and 6.98B non-embedding parameters.
    "8b": ModelConfig(name="8b", num_layers=32, d_model=4096, num_heads=32, d_ff=12288,
                      mlp="swiglu", norm="rmsnorm", max_seq_len=4096),
    # LLaDA-1B's shape (the same Table 5): 22 layers, d=2048, 32 heads sharing 4 key/value heads
    # (grouped-query attention), SwiGLU FFN 5,634, RMSNorm, RoPE, untied embedding and head,
    # 4,096-token context. With LLaDA's vocabulary (vocab_size=LLADA_VOCAB - 1, as for 8b) the
    # counts are the paper's 1.49B total and 0.97B non-embedding parameters.
    "1b": ModelConfig(name="1b", num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                      d_ff=5634, mlp="swiglu", norm="rmsnorm", max_seq_len=4096),
}

LLADA_VOCAB = 126_464  # LLaDA's tokenizer, its mask token included


def get(name: str, **overrides) -> ModelConfig:
  """A preset by name, with field overrides (e.g. get("small", kind="ar", vocab_size=32000))."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)} or build a "
                     "ModelConfig(num_layers=..., d_model=..., num_heads=...) directly.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"Unknown ModelConfig fields {sorted(unknown)}.")
  return dataclasses.replace(PRESETS[name], **overrides).validate()


def custom(num_layers: int, d_model: int, num_heads: int, **overrides) -> ModelConfig:
  return ModelConfig(name=f"L{num_layers}-d{d_model}-h{num_heads}", num_layers=num_layers,
                     d_model=d_model, num_heads=num_heads, **overrides).validate()


def count_params(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, int]:
  """Closed-form parameter counts (checked against the built model in the tests)."""
  v = vocab_size if vocab_size is not None else cfg.vocab_size
  d, f, c, n = cfg.d_model, cfg.ff_dim, cfg.cond_dim, cfg.num_layers
  kv = 2 * d * cfg.kv_heads * cfg.head_dim  # keys and values: fewer heads under GQA
  attn = d * d + kv + d * d  # queries, keys and values, output
  mlp = (2 * d * f if cfg.mlp == "swiglu" else d * f) + f * d
  mlp_bias = ((2 * f if cfg.mlp == "swiglu" else f) + d) if cfg.mlp_bias else 0
  norms = 2 * d
  ada = (c * 6 * d + 6 * d) if cfg.conditioned else 0
  per_block = attn + mlp + mlp_bias + norms + ada
  cond = (cfg.freq_dim * c + c * c + c * 2 * d + 2 * d) if cfg.conditioned else 0
  cond += 2 * c if cfg.conditioned and cfg.cond_bias else 0
  embedding = (v + 1) * d
  head = (0 if cfg.tie_embeddings else d * v) + (v if cfg.head_bias else 0)
  non_embedding = n * per_block + d + cond
  matmul = n * (attn + mlp) + d * v  # the output product runs even when tied
  return {
      "total": non_embedding + embedding + head,
      "non_embedding": non_embedding,
      "embedding": embedding + head,
      "matmul": matmul,
  }


def flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int | None = None) -> dict[str, float]:
  """Training FLOPs per token: {"6N": 6 N_non_embedding, "full": 6 N_matmul + 12 n L d}."""
  counts = count_params(cfg, vocab_size)
  attention = 12.0 * cfg.num_layers * seq_len * cfg.d_model
  return {"6N": 6.0 * counts["non_embedding"], "full": 6.0 * counts["matmul"] + attention,
          "attention": attention}
