"""Sample quality: generative perplexity under an AR evaluator, and unigram entropy.

Generative perplexity (MDLM section 4.1 scores samples with GPT-2 large) is exp of the mean
next-token NLL of the samples under a separately trained autoregressive model. Here any mdlm AR
checkpoint serves. With a different tokenizer the samples are decoded and re-tokenized for the
evaluator; sequences longer than the evaluator's context are scored in consecutive chunks.

Unigram entropy (Zheng et al. 2024) is the entropy of each sample's empirical token distribution,
averaged over samples: inexact categorical sampling lowers it, which a perplexity alone hides
(repetitive text scores well).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdlm import diffusion
from mdlm.sampling.denoisers import _GraphKey


def unigram_entropy(tokens_NxL, *, ignore: Iterable[int] = ()) -> dict:
  """Per-sample entropy (nats) of the token histogram, ignoring ids in `ignore` (e.g. specials).

  Returns {"mean", "per_sample"}.
  """
  tokens = np.asarray(tokens_NxL)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [num_samples, length], got shape {tokens.shape}.")
  ignore = set(int(i) for i in ignore)
  values = []
  for row in tokens:
    kept = np.asarray([t for t in row.tolist() if t not in ignore])
    if kept.size == 0:
      values.append(0.0)
      continue
    _, counts = np.unique(kept, return_counts=True)
    p = counts / counts.sum()
    values.append(float(-(p * np.log(p)).sum()))
  return {"mean": float(np.mean(values)), "per_sample": values}


@jax.jit(static_argnames="graph")
def _score(graph, state, tokens_BxL, mask_BxL):
  """(sum of next-token NLL, count) over the real positions of a batch."""
  logits = nnx.merge(graph.graphdef, state)(tokens_BxL)
  nll_BxL1 = diffusion.ar_nll(logits, tokens_BxL, mask_BxL)
  counted = mask_BxL[:, 1:] & mask_BxL[:, :-1]
  return jnp.sum(jnp.where(counted, nll_BxL1, 0.0)), jnp.sum(counted)


def _scorer(model):
  """tokens, mask -> (sum NLL, count) for an AR model; compiled once per architecture."""
  if model.cfg.kind != "ar":
    raise ValueError(f"the generative-perplexity evaluator must be an AR model (kind 'ar'); got "
                     f"kind {model.cfg.kind!r}.")
  graphdef, state = nnx.split(model)
  graph = _GraphKey(graphdef, repr(model.cfg))
  return lambda tokens, mask: _score(graph, state, tokens, mask)


def _chunks(seqs: Sequence[Sequence[int]], context: int, pad_id: int):
  """Splits sequences into rows of at most `context` tokens: (tokens, mask) int32/bool arrays."""
  rows = []
  for seq in seqs:
    seq = list(seq)
    for start in range(0, max(len(seq), 1), context):
      piece = seq[start:start + context]
      if len(piece) >= 2:
        rows.append(piece)
  if not rows:
    raise ValueError("no sequence has the two tokens needed to score a next-token prediction.")
  width = max(len(r) for r in rows)
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = True
  return tokens, mask


def generative_perplexity(ar_model, sequences: Sequence[Sequence[int]], *, pad_id: int = 0,
                          batch_size: int = 16) -> dict:
  """exp(mean next-token NLL) of token sequences (evaluator's vocabulary) under an AR model.

  Each sequence should start with BOS (its first token is context only); padding is excluded.
  Returns {"gen_ppl", "nll", "num_tokens"}.
  """
  score = _scorer(ar_model)
  tokens, mask = _chunks(sequences, ar_model.cfg.max_seq_len, pad_id)
  total, count = 0.0, 0
  for start in range(0, len(tokens), batch_size):
    t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
    if len(t) < batch_size:  # pad the batch so every call has one shape (one compile)
      fill = batch_size - len(t)
      t = np.concatenate([t, np.full((fill, t.shape[1]), pad_id, np.int32)])
      m = np.concatenate([m, np.zeros((fill, m.shape[1]), bool)])
    s, c = score(jnp.asarray(t), jnp.asarray(m))
    total, count = total + float(s), count + int(c)
  nll = total / max(count, 1)
  return {"gen_ppl": math.exp(min(nll, 700.0)), "nll": nll, "num_tokens": count}


def generative_perplexity_text(ar_model, tokenizer, texts: Sequence[str], *, add_bos: bool = True,
                               batch_size: int = 16) -> dict:
  """Generative perplexity of texts, re-tokenized with the evaluator's tokenizer."""
  seqs = [([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(t)) for t in texts]
  return generative_perplexity(ar_model, seqs, pad_id=int(tokenizer.pad_id), batch_size=batch_size)


def strip_specials(tokens_NxL, specials: Iterable[int], mask_id: Optional[int] = None):
  """Rows as lists without the given ids (e.g. PAD, a leftover mask)."""
  drop = set(int(s) for s in specials) | ({int(mask_id)} if mask_id is not None else set())
  return [[t for t in row if t not in drop] for row in np.asarray(tokens_NxL).tolist()]
