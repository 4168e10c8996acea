"""MEAP: next-token training of the causal model with a fraction of its *inputs* masked.

Zhuang et al. 2025, "Mask-Enhanced Autoregressive Prediction: Pay Less Attention to Learn More":
a fraction p of the input tokens is replaced by the mask id; the targets stay the clean next
tokens, attention stays causal, inference is unchanged.

Masking here (`meap_mask`) draws a fresh pattern for every sequence and masks exactly
n_b = round(p * E_b) positions of row b (halves rounded up), where E_b counts its eligible
positions. A position i is
eligible when
  - it is a real token (token_mask_i) and not BOS, and
  - its own next-token target exists (i < L - 1 and token_mask_{i+1}): masking the input of the
    last position (of the window, or before padding) would hide a token no prediction looks at.
Shapes are static: each row ranks uniform scores over its eligible positions and masks its n_b
lowest ranks.

The fine-tuning variant's examples (a prompt-response pair, and a copy whose response tokens are
partly masked, labelled only there) are built by the data pipeline (mdlm.data.sft); `sft_terms`
scores them.
"""

from __future__ import annotations

import jax.numpy as jnp

from mdlm import diffusion, masking
from mdlm.data.sft import IGNORE
from mdlm.masking import mask_count


def eligible_positions(tokens_BxL, token_mask_BxL=None, *, bos_id: int | None):
  """Bool [B, L]: positions that MEAP may mask (see the module docstring)."""
  tokens_BxL = jnp.asarray(tokens_BxL)
  real_BxL = (jnp.ones(tokens_BxL.shape, bool) if token_mask_BxL is None
              else jnp.asarray(token_mask_BxL, bool))
  has_target_BxL = jnp.concatenate(
      [real_BxL[:, 1:], jnp.zeros((tokens_BxL.shape[0], 1), bool)], axis=1)
  eligible = real_BxL & has_target_BxL
  if bos_id is not None:
    eligible = eligible & (tokens_BxL != bos_id)
  return eligible


def meap_mask(key, tokens_BxL, token_mask_BxL=None, *, ratio: float, mask_id: int,
              bos_id: int | None):
  """Returns (inputs_BxL, masked_BxL): tokens with exactly mask_count(eligible_b, ratio) =
  round(ratio * eligible_b) eligible positions of each row b replaced by mask_id, a fresh
  uniformly random subset per row."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"MEAP ratio must lie in [0, 1), got {ratio}.")
  tokens_BxL = jnp.asarray(tokens_BxL)
  if tokens_BxL.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens_BxL.shape}.")
  eligible_BxL = eligible_positions(tokens_BxL, token_mask_BxL, bos_id=bos_id)
  count_Bx1 = mask_count(jnp.sum(eligible_BxL, axis=1, keepdims=True), ratio)
  masked_BxL = masking.choose_uniform(key, eligible_BxL, count_Bx1)
  inputs_BxL = jnp.where(masked_BxL, jnp.asarray(mask_id, tokens_BxL.dtype), tokens_BxL)
  return inputs_BxL, masked_BxL


def sft_terms(model, batch, *, attention_mask_BxL=None,
              dropout_key=None) -> diffusion.LossTerms:
  """Per-sequence NLL of the labels of padded SFT examples, as diffusion.LossTerms.

  batch: {"tokens": int [B, L], "labels": int [B, L] (IGNORE: no loss)}. The logits at i - 1
  score labels[i]; num_tokens_B = num_masked_B counts the labels, so sum(nll_sum_B) /
  sum(num_tokens_B) is the mean NLL per label. attention_mask_BxL goes to the model as its key
  mask (a causal model needs none for right padding)."""
  tokens_BxL, labels_BxL = jnp.asarray(batch["tokens"]), jnp.asarray(batch["labels"])
  logits = model(tokens_BxL, token_mask_BxL=attention_mask_BxL, dropout_key=dropout_key)
  # Next-token NLL with the labels as targets, counted only where a label is given.
  labelled_BxL = labels_BxL != IGNORE
  nll_BxLm1 = diffusion.ar_nll(logits, jnp.maximum(labels_BxL, 0), labelled_BxL)
  count_B = jnp.sum(labelled_BxL[:, 1:], axis=-1).astype(jnp.float32)
  return diffusion.LossTerms(jnp.sum(nll_BxLm1, axis=-1), count_B, count_B)


def num_labels(labels_BxL):
  """The labels that carry loss (position 0 has no prediction before it): float32 scalar."""
  return jnp.sum(jnp.asarray(labels_BxL)[:, 1:] != IGNORE).astype(jnp.float32)


def sft_loss(model, batch):
  """(nll_sum, num_labels) for padded SFT examples: the logits at i - 1 score labels[i]."""
  terms = sft_terms(model, batch, attention_mask_BxL=batch.get("token_mask"))
  return jnp.sum(terms.nll_sum_B), jnp.sum(terms.num_tokens_B)
