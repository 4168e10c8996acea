"""Training objectives: each maps (model, batch, key) to per-sequence loss sums and token counts.

An objective returns `LossTerms(nll_sum_B, num_tokens_B, num_masked_B)` (see mdlm.diffusion), so
the trainer can normalise by real tokens over the *global* batch, accumulate gradients exactly, and
evaluation can report standard errors over sequences. Register new objectives in OBJECTIVES.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mdlm import diffusion
from mdlm import meap
from mdlm.models import hybrid
from mdlm.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class Context:
  """Static settings an objective needs (hashable: part of the jitted step's closure)."""

  schedule: Schedule
  mask_id: int
  bos_id: int = -1
  pad_layout: bool = False       # pass the padding mask to attention (pad layout only)
  t_min: float = diffusion.T_MIN
  num_steps: Optional[int] = None
  antithetic: bool = True
  meap_ratio: float = 0.15


def _attention_mask(batch, ctx):
  return batch["token_mask"] if ctx.pad_layout else None


def diffusion_objective(model, batch, key, ctx: Context, dropout_key=None) -> diffusion.LossTerms:
  """Masked-diffusion NELBO terms.

  Uses batch["t"] and batch["xt"] when given (the trainer draws them over the whole global batch,
  so micro-batching does not change the sample); otherwise draws them here."""
  x0, token_mask = batch["tokens"], batch["token_mask"]
  if "t" not in batch:
    batch = dict(batch, **corrupt_batch(batch, key, ctx))
  t_B, xt = batch["t"], batch["xt"]
  noise = ctx.schedule.mask_prob(t_B) if model.cfg.time_conditioning else None
  logits = model(xt, noise, token_mask_BxL=_attention_mask(batch, ctx), dropout_key=dropout_key)
  per_token = diffusion.nelbo(logits, x0, xt, t_B, ctx.schedule, ctx.mask_id, token_mask,
                              num_steps=ctx.num_steps, t_min=ctx.t_min)
  return diffusion.loss_terms(per_token, token_mask, (xt == ctx.mask_id) & token_mask)


def corrupt_batch(batch, key, ctx: Context) -> dict:
  """Antithetic times over the batch and the forward process: {"t": [B], "xt": [B, L]}."""
  x0 = batch["tokens"]
  t_B = diffusion.sample_times(jax.random.fold_in(key, 0), x0.shape[0], t_min=ctx.t_min,
                               antithetic=ctx.antithetic)
  if ctx.num_steps is not None:
    t_B = diffusion.discretize_times(t_B, ctx.num_steps)
  xt = diffusion.corrupt(jax.random.fold_in(key, 1), x0, t_B, ctx.schedule, ctx.mask_id,
                         batch["token_mask"])
  return {"t": t_B, "xt": xt}


def ar_objective(model, batch, key, ctx: Context, dropout_key=None) -> diffusion.LossTerms:
  """Exact next-token NLL: position i predicts token i + 1; L - 1 targets per window.

  With batch["labels"] (data.meap_sft: MEAP-SFT examples, mdlm.data.sft) only the labelled
  positions are scored, from the inputs as given (masked copies included): mdlm.meap.sft_terms.
  """
  del key
  if "labels" in batch:
    return meap.sft_terms(model, batch, attention_mask_BxL=_attention_mask(batch, ctx),
                          dropout_key=dropout_key)
  x, token_mask = batch["tokens"], batch["token_mask"]
  logits = model(x, token_mask_BxL=_attention_mask(batch, ctx), dropout_key=dropout_key)
  nll = diffusion.ar_nll(logits, x, token_mask)
  counted = token_mask[:, 1:]
  return diffusion.LossTerms(nll.sum(-1), counted.sum(-1).astype(jnp.float32),
                             counted.sum(-1).astype(jnp.float32))


def meap_objective(model, batch, key, ctx: Context, dropout_key=None) -> diffusion.LossTerms:
  """MEAP (mdlm.meap): next-token NLL of the clean tokens from inputs with ctx.meap_ratio of the
  eligible positions masked (a fresh exact-count pattern per sequence)."""
  if "labels" in batch:
    raise ValueError("objective=meap masks the inputs itself and ignores labels; MEAP-SFT "
                     "batches (data.meap_sft=true) train with objective=ar.")
  return meap.meap_loss(model, batch, key, ratio=ctx.meap_ratio, mask_id=ctx.mask_id,
                        bos_id=ctx.bos_id if ctx.bos_id >= 0 else None,
                        attention_mask_BxL=_attention_mask(batch, ctx), dropout_key=dropout_key)


def maria_objective(head, batch, key, ctx: Context, dropout_key=None) -> diffusion.LossTerms:
  """MARIA head (mdlm.models.hybrid): cross-entropy at masked positions; num_tokens_B counts the
  masked tokens, so evaluation reports nats per masked token. Uses batch["xt"] / batch["noise"]
  when given (maria_corrupt_batch), else draws them. The backbones run without dropout."""
  del dropout_key
  return hybrid.maria_loss(head, batch, key, schedule=ctx.schedule, t_min=ctx.t_min,
                           antithetic=ctx.antithetic)


def maria_corrupt_batch(batch, key, ctx: Context) -> dict:
  """MARIA's masking drawn over the whole (global) batch: {"xt": [B, L], "noise": [B]}."""
  xt_BxL, noise_B = hybrid.maria_corrupt(key, batch["tokens"], batch.get("token_mask"),
                                         mask_id=ctx.mask_id, schedule=ctx.schedule,
                                         t_min=ctx.t_min, antithetic=ctx.antithetic)
  return {"xt": xt_BxL, "noise": noise_B}


def loss_denominator(objective: str, batch, ctx: Context):
  """What the trainer divides the summed loss of a global batch by (float32 scalar), so that the
  training loss is in the same unit as evaluation's sum(nll_sum_B) / sum(num_tokens_B):
  labels (MEAP-SFT), next-token targets (ar, meap), masked tokens of the drawn xt (maria; the
  trainer draws xt before micro-batching) or real tokens (diffusion NELBO per token)."""
  token_mask = jnp.asarray(batch["token_mask"], bool)
  if objective in ("ar", "meap") and "labels" in batch:
    return meap.num_labels(batch["labels"])
  if objective in ("ar", "meap"):
    return jnp.sum(token_mask[:, 1:]).astype(jnp.float32)
  if objective == "maria":
    return jnp.sum((jnp.asarray(batch["xt"]) == ctx.mask_id) & token_mask).astype(jnp.float32)
  return jnp.sum(token_mask).astype(jnp.float32)


Objective = Callable[..., diffusion.LossTerms]

OBJECTIVES: dict[str, Objective] = {
    "diffusion": diffusion_objective,
    "ar": ar_objective,
    "meap": meap_objective,
    "maria": maria_objective,
}

# The objective used to *evaluate* a model trained with a given objective (MEAP models are
# ordinary AR models at inference).
EVAL_OBJECTIVE: dict[str, str] = {"diffusion": "diffusion", "ar": "ar", "meap": "ar",
                                  "maria": "maria"}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective {name!r}; available: {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]
