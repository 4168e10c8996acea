"""Two-token joint distributions derived from a masked model (Torroba Hennigen and Kim 2023,
"Deriving Language Models from Masked Language Models").

A bidirectional denoiser gives conditionals, not a joint. For two positions i, j of a sequence x,
the rest x_{-ij} observed, it gives (x_i masked and x_j set to b, and the other way round)
  q_{i|j}(a | b) = p_theta(x_i = a | x_j = b, x_{-ij}),
  q_{j|i}(b | a) = p_theta(x_j = b | x_i = a, x_{-ij}),
and, with both masked, the unary predictions q_i(a), q_j(b). The q's need not be the conditionals
of any joint. The joints derived from them over a support S_i x S_j (pure functions on tables
[..., |S_i|, |S_j|] of log-probabilities, rows a = x_i, columns b = x_j):

  unary      q_i(a) q_j(b): the masked model's own joint over two masked positions (the two
             predicted independently from the doubly masked input).
  mrf        ∝ q_{i|j}(a|b) q_{j|i}(b|a): the pairwise Markov random field of the unary
             conditionals (Wang and Cho 2019, "BERT has a Mouth, and It Must Speak"; Goyal, Dyer
             and Berg-Kirkpatrick 2022, "Exposing the Implicit Energy Networks behind Masked
             Language Models via Metropolis-Hastings"). Not faithful even to consistent
             conditionals: for q the conditionals of a joint P it gives P(a,b)^2 / (P_i(a) P_j(b)),
             renormalised.
  mrf_logit  ∝ exp(f_{i|j}(a|b) + f_{j|i}(b|a)) with the raw logits f (the MRF of those papers'
             scores before normalisation; the paper's logit variant).
  hcb        Hammersley-Clifford-Besag (Besag 1974, "Spatial interaction and the statistical
             analysis of lattice systems"): a positive joint P satisfies, for any pivot a*,
             P(a, b) ∝ P(a|b) P(b|a*) / P(a*|b). With q for P:
             ∝ q_{i|j}(a|b) q_{j|i}(b|a*) / q_{i|j}(a*|b). Exact for consistent q whatever the
             pivot; otherwise it depends on the pivot. Pivot: the argmax of the doubly masked q_i
             (the paper's code, "hcb-both"); it pivots on position i.
  ag         Arnold and Gokhale (1998), "Distributions most nearly compatible with given families
             of conditional distributions": the joint whose conditionals are closest to q's,
               argmin_p  sum_b KL(q_{i|j}(.|b) || p_{i|j}(.|b))
                       + sum_a KL(q_{j|i}(.|a) || p_{j|i}(.|a)),
             by the fixed-point iteration of its stationarity condition (the paper's procedure)
               p(a, b) <- (q_{i|j}(a|b) + q_{j|i}(b|a)) / (1 / p_i(a) + 1 / p_j(b)), renormalised,
             from the uniform joint until no marginal moves by more than `ag_tol` in a step
             (at most `ag_iterations`; p_i, p_j: the marginals of p). The objective is not convex;
             the iteration reaches its optimum on every table checked (tests/test_joints.py).

Metrics, per pair, as the paper (and its code) defines them:
  pair NLL   -log p(x_i, x_j); P-PPL = exp(mean pair NLL / 2), a perplexity per token.
  unary NLL  -[log p_{i|j}(x_i | x_j) + log p_{j|i}(x_j | x_i)] with the joint's own conditionals;
             U-PPL = exp(mean / 2). For the model itself ("conditionals") it is q's
             pseudo-log-likelihood of the two tokens.
  KL (all)   the consistency of the joint with the model: the forward KL from the model's
             conditional to the joint's, averaged over all |S_i| + |S_j| conditioning values,
               [sum_{b in S_j} KL(q_{i|j}(.|b) || p_{i|j}(.|b))
                + sum_{a in S_i} KL(q_{j|i}(.|a) || p_{j|i}(.|a))] / (|S_i| + |S_j|)
             (the code's "all_kls_fwd"). AG minimises exactly this, times |S_i| + |S_j|.
  KL (true)  the two KLs at the true conditioning tokens only (b = x_j, a = x_i), averaged.

Support. Exact (top_k None): S_i = S_j = the V tokens, 2V + 1 forward passes per pair. Top-K (the
paper's restriction for large vocabularies): K candidates per position, the true token first, then
the (K - 1) // 2 most probable under the model's conditional at the true other token (only that
position masked), then the most probable remaining under the doubly masked prediction (the
paper's code, with the true token forced in); every distribution is renormalised over the support.
The true pair is always inside the K x K support: top-K figures score a slate that holds the
answer, so they are optimistic next to exact ones, and the uniform joint over the slate scores
P-PPL = K exactly, a bar a weak model's joints can fail to clear. `truth_forced` counts the pairs
whose true tokens were not candidates on their own merit (the paper's code's "harsh" case).
2K + 3 forward passes per pair; the V (or K) substitutions of one position are one batched,
jit-compiled forward pass (chunked by `chunk` rows with lax.map), never a loop over tokens.

AR reference (`ar_pair_joint`): an autoregressive model's exact p(x_i = a, x_j = b | x_{<j} without
x_i) for pairs whose x_j is the last token of the window: then the masked model conditions on
exactly the same tokens (nothing lies right of j), and the AR joint is its chain rule over
positions i..j, one causal pass per value of x_i.

  python -m mdlm.joints run=<denoiser run> [kinds=[adjacent,distant]] [num_pairs=64] [top_k=null]
      [ar_run=<AR run> kinds=[adjacent_end,distant_end]] [positions=[[3,4],[10,40]]]

writes <run>/joints_<split>[_top<K>].json and .md (the table).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mdlm import checkpointing, cli, objectives
from mdlm import data as data_lib
from mdlm.rundir import RunDir, load_run

CONSTRUCTIONS = ("unary", "mrf", "mrf_logit", "hcb", "ag")
AG_ITERATIONS = 2000   # the most AG iterations; it stops once converged (AG_TOL)
AG_TOL = 1e-7          # converged: no marginal probability moves by more than this
DEFAULT_CHUNK = 128
PAIR_KINDS = {
    "adjacent": "j = i + 1",
    "distant": "i < j - 1, uniform over such pairs",
    "adjacent_end": "j = i + 1 = the last position (the AR reference applies)",
    "distant_end": "j = the last position, 1 <= i < j - 1 (the AR reference applies)",
    "positions": "the positions given",
}


# ----------------------------------------------------------------------------- joints of tables


def normalize_joint(score_AxB):
  """log p over the last two axes from unnormalised log scores."""
  return score_AxB - jax.nn.logsumexp(score_AxB, axis=(-2, -1), keepdims=True)


def conditionals_of(log_joint_AxB):
  """(log p_{i|j}(a|b), normalised over a; log p_{j|i}(b|a), normalised over b), both [.., A, B]."""
  return (log_joint_AxB - jax.nn.logsumexp(log_joint_AxB, axis=-2, keepdims=True),
          log_joint_AxB - jax.nn.logsumexp(log_joint_AxB, axis=-1, keepdims=True))


def unary_joint(log_marg_i_A, log_marg_j_B):
  """q_i(a) q_j(b): both positions predicted independently (from the doubly masked input)."""
  return normalize_joint(log_marg_i_A[..., :, None] + log_marg_j_B[..., None, :])


def mrf_joint(score_i_AxB, score_j_AxB):
  """∝ exp(s_i + s_j): with log conditionals, the MRF; with raw logits, its logit variant."""
  return normalize_joint(score_i_AxB + score_j_AxB)


def hcb_joint(log_cond_i_AxB, log_cond_j_AxB, pivot):
  """Hammersley-Clifford-Besag with pivot a* (an index into S_i, one per leading index):
  ∝ q_{i|j}(a|b) q_{j|i}(b|a*) / q_{i|j}(a*|b)."""
  shape = log_cond_i_AxB.shape
  idx = jnp.broadcast_to(jnp.asarray(pivot, jnp.int32)[..., None, None],
                         shape[:-2] + (1, shape[-1]))
  at_pivot_i = jnp.take_along_axis(log_cond_i_AxB, idx, axis=-2)
  at_pivot_j = jnp.take_along_axis(log_cond_j_AxB, idx, axis=-2)
  return normalize_joint(log_cond_i_AxB - at_pivot_i + at_pivot_j)


def _ag_marginals(num_AxB, log_pi_A, log_pj_B):
  """One AG update of the marginals, without leaving the log domain where it matters. With
  s = sigmoid(log p_j(b) - log p_i(a)) = p_j / (p_i + p_j), the unnormalised update is
    p(a, b) = num (p_i p_j) / (p_i + p_j) = p_i(a) num s = p_j(b) num (1 - s),
  so its row sums are p_i(a) sum_b num s and its column sums p_j(b) sum_a num (1 - s): one exp
  per entry, and no product of two small probabilities is ever formed."""
  x = log_pj_B[..., None, :] - log_pi_A[..., :, None]
  e = jnp.exp(-jnp.abs(x))
  s = jnp.where(x >= 0, 1.0, e) / (1.0 + e)
  tiny = jnp.finfo(num_AxB.dtype).tiny
  rows = log_pi_A + jnp.log(jnp.maximum(jnp.sum(num_AxB * s, axis=-1), tiny))
  cols = log_pj_B + jnp.log(jnp.maximum(jnp.sum(num_AxB * (1.0 - s), axis=-2), tiny))
  log_z = jax.nn.logsumexp(rows, axis=-1, keepdims=True)
  return rows - log_z, cols - log_z


def ag_solve(log_cond_i_AxB, log_cond_j_AxB, max_iterations: int = AG_ITERATIONS,
             tol: float = AG_TOL):
  """Arnold-Gokhale: the fixed-point iteration p <- (q_{i|j} + q_{j|i}) / (1/p_i + 1/p_j) from the
  uniform joint. The map depends on p only through its marginals, so those are the state (log
  probabilities; `_ag_marginals`); it stops when no marginal probability moves by more than `tol`
  in one step, or after `max_iterations` updates. The joint is formed once, in log space, from
  the last marginals. Returns (log p [.., A, B], the updates each table took to converge [..])."""
  log_num = jnp.logaddexp(log_cond_i_AxB, log_cond_j_AxB)
  num = jnp.exp(log_num)
  a, b = log_cond_i_AxB.shape[-2:]
  lead = log_num.shape[:-2]

  def body(state):
    n, log_pi, log_pj, steps, _ = state
    new_i, new_j = _ag_marginals(num, log_pi, log_pj)
    moved = jnp.maximum(jnp.max(jnp.abs(jnp.exp(new_i) - jnp.exp(log_pi)), axis=-1),
                        jnp.max(jnp.abs(jnp.exp(new_j) - jnp.exp(log_pj)), axis=-1))
    moving = moved > tol
    return n + 1, new_i, new_j, jnp.where(moving, n + 1, steps), jnp.any(moving)

  def going(state):  # the joint formed below is the last of the max_iterations updates
    return (state[0] < max_iterations - 1) & state[4]

  start = (0, jnp.full(lead + (a,), -math.log(a), log_num.dtype),
           jnp.full(lead + (b,), -math.log(b), log_num.dtype), jnp.zeros(lead, jnp.int32),
           jnp.asarray(True))
  _, log_pi, log_pj, steps, _ = jax.lax.while_loop(going, body, start)
  log_p = log_num - jnp.logaddexp(-log_pi[..., :, None], -log_pj[..., None, :])
  return normalize_joint(log_p), jnp.minimum(steps + 1, max_iterations)


def ag_joint(log_cond_i_AxB, log_cond_j_AxB, max_iterations: int = AG_ITERATIONS,
             tol: float = AG_TOL):
  """AG's joint (ag_solve without the iteration counts); tol=0 runs max_iterations steps."""
  return ag_solve(log_cond_i_AxB, log_cond_j_AxB, max_iterations, tol)[0]


def _kl(log_q, log_p, axis):
  """sum_axis q (log q - log p), with 0 log 0 = 0."""
  q = jnp.exp(log_q)
  return jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=axis)


def conditional_kls(log_joint_AxB, log_cond_i_AxB, log_cond_j_AxB):
  """(KL(q_{i|j}(.|b) || p_{i|j}(.|b)) for each b: [.., B]; KL(q_{j|i}(.|a) || p_{j|i}(.|a)) for
  each a: [.., A]) between the model's conditionals q and those of the joint p."""
  p_i, p_j = conditionals_of(log_joint_AxB)
  return _kl(log_cond_i_AxB, p_i, -2), _kl(log_cond_j_AxB, p_j, -1)


def ag_objective(log_joint_AxB, log_cond_i_AxB, log_cond_j_AxB):
  """The sum of all conditional KLs, which AG minimises (= (A + B) x KL (all))."""
  kl_i_B, kl_j_A = conditional_kls(log_joint_AxB, log_cond_i_AxB, log_cond_j_AxB)
  return jnp.sum(kl_i_B, -1) + jnp.sum(kl_j_A, -1)


def derive_joints(log_cond_i_AxB, log_cond_j_AxB, logit_i_AxB, logit_j_AxB, log_marg_i_A,
                  log_marg_j_B, pivot, ag_iterations: int = AG_ITERATIONS, ag_tol: float = AG_TOL,
                  return_ag_steps: bool = False):
  """Every construction's log joint [.., A, B] from one set of tables (and AG's iterations)."""
  ag, steps = ag_solve(log_cond_i_AxB, log_cond_j_AxB, ag_iterations, ag_tol)
  out = {"unary": unary_joint(log_marg_i_A, log_marg_j_B),
         "mrf": mrf_joint(log_cond_i_AxB, log_cond_j_AxB),
         "mrf_logit": mrf_joint(logit_i_AxB, logit_j_AxB),
         "hcb": hcb_joint(log_cond_i_AxB, log_cond_j_AxB, pivot), "ag": ag}
  return (out, steps) if return_ag_steps else out


def _at(x_BxAxC, true_i_B, true_j_B):
  rows = jnp.arange(x_BxAxC.shape[0])
  return x_BxAxC[rows, true_i_B, true_j_B]


def pair_metrics(log_joint_BxAxC, log_cond_i_BxAxC, log_cond_j_BxAxC, true_i_B, true_j_B) -> dict:
  """Per pair: pair NLL, unary NLL (nats, summed over the two tokens), KL (all), KL (true)."""
  p_i, p_j = conditionals_of(log_joint_BxAxC)
  kl_i_BxC, kl_j_BxA = conditional_kls(log_joint_BxAxC, log_cond_i_BxAxC, log_cond_j_BxAxC)
  rows = jnp.arange(log_joint_BxAxC.shape[0])
  size = kl_i_BxC.shape[-1] + kl_j_BxA.shape[-1]
  return {"nll_pair": -_at(log_joint_BxAxC, true_i_B, true_j_B),
          "nll_unary": -(_at(p_i, true_i_B, true_j_B) + _at(p_j, true_i_B, true_j_B)),
          "kl_all": (jnp.sum(kl_i_BxC, -1) + jnp.sum(kl_j_BxA, -1)) / size,
          "kl_true": 0.5 * (kl_i_BxC[rows, true_j_B] + kl_j_BxA[rows, true_i_B])}


# ----------------------------------------------------------------------------- the model's tables


class PairTables(NamedTuple):
  """What a denoiser says about pairs (i, j) of B sequences, over supports S_i (A tokens) and S_j
  (C tokens). `logit_*` are the model's raw logits, gathered to the support."""

  support_i: jax.Array      # [B, A] token ids
  support_j: jax.Array      # [B, C]
  true_i: jax.Array         # [B] index of the true x_i in support_i
  true_j: jax.Array         # [B]
  logit_i: jax.Array        # [B, A, C] logit of x_i = a given x_j = b (x_i masked)
  logit_j: jax.Array        # [B, A, C] logit of x_j = b given x_i = a (x_j masked)
  marg_logit_i: jax.Array   # [B, A] logit of x_i = a with both masked
  marg_logit_j: jax.Array   # [B, C]
  forced: jax.Array         # [B, 2] top-K: x_i, x_j were put in their supports, not chosen

  def log_cond_i(self):
    return jax.nn.log_softmax(self.logit_i, axis=-2)

  def log_cond_j(self):
    return jax.nn.log_softmax(self.logit_j, axis=-1)

  def log_marg_i(self):
    return jax.nn.log_softmax(self.marg_logit_i, axis=-1)

  def log_marg_j(self):
    return jax.nn.log_softmax(self.marg_logit_j, axis=-1)

  def pivot(self):
    """HCB's pivot: the doubly masked argmax at i (an index into support_i)."""
    return jnp.argmax(self.marg_logit_i, axis=-1)

  def joints(self, ag_iterations: int = AG_ITERATIONS, ag_tol: float = AG_TOL,
             return_ag_steps: bool = False):
    """{construction: log joint [B, A, C]} (and AG's iterations [B] with return_ag_steps)."""
    return derive_joints(self.log_cond_i(), self.log_cond_j(), self.logit_i, self.logit_j,
                         self.log_marg_i(), self.log_marg_j(), self.pivot(), ag_iterations, ag_tol,
                         return_ag_steps)


def _logits_at(model, rows_NxL, pos_NxP, masked_N, attention_NxL):
  """The model's logits [N, P, V] at P positions per row, with `masked_N` of its real tokens
  masked (the noise level a time-conditioned model reads, as mdlm.measures passes it)."""
  noise = None
  if model.cfg.time_conditioning:
    noise = masked_N / jnp.maximum(jnp.sum(attention_NxL, axis=1), 1)
  hidden = model.hidden_states(rows_NxL, noise, token_mask_BxL=attention_NxL, causal=False)
  return model.logits(jnp.take_along_axis(hidden, pos_NxP[:, :, None], axis=1))


def _chunks(values_BxK, chunk: int):
  """values padded (repeating the last) to n chunks of c: ([n, B, c], K)."""
  batch, k = values_BxK.shape
  c = min(chunk, k)
  n = -(-k // c)
  padded = jnp.pad(values_BxK, ((0, 0), (0, n * c - k)), mode="edge")
  return padded.reshape(batch, n, c).transpose(1, 0, 2), k


def substituted_logits(model, x_BxL, read_B, write_B, values_BxK, attention_BxL,
                       chunk: int = DEFAULT_CHUNK):
  """[B, K, V]: the logits at position read_B of x with position write_B set to each of K values
  (one mask left in the row, at read_B). The K substitutions run as batched forward passes of
  B x chunk rows (lax.map over the chunks)."""
  batch, length = x_BxL.shape
  values_NxBxc, k = _chunks(values_BxK, chunk)
  c = values_NxBxc.shape[-1]
  hit_BxL = jnp.arange(length)[None, :] == write_B[:, None]
  read_Nx1 = jnp.repeat(read_B, c)[:, None]
  attention = jnp.repeat(attention_BxL, c, axis=0)
  ones = jnp.ones((batch * c,), jnp.float32)

  def one(vals_Bxc):
    rows = jnp.where(hit_BxL[:, None, :], vals_Bxc[:, :, None], x_BxL[:, None, :])
    out = _logits_at(model, rows.reshape(batch * c, length), read_Nx1, ones, attention)
    return out.reshape(batch, c, -1)

  out = jax.lax.map(one, values_NxBxc)
  return out.transpose(1, 0, 2, 3).reshape(batch, -1, out.shape[-1])[:, :k]


def _mask_pair(tokens_BxL, i_B, j_B, mask_id):
  rows = jnp.arange(tokens_BxL.shape[0])
  return tokens_BxL.at[rows, i_B].set(mask_id).at[rows, j_B].set(mask_id)


def _candidates(true_B, single_BxV, double_BxV, k: int):
  """K token ids per row: the true one, the (K - 1) // 2 best of `single` (the conditional at the
  true other token), then the best remaining of `double` (the doubly masked prediction)."""
  batch, vocab = single_BxV.shape
  rows = jnp.arange(batch)[:, None]
  taken = jnp.zeros((batch, vocab), bool).at[rows[:, 0], true_B].set(True)
  parts = [true_B[:, None]]
  n_single = (k - 1) // 2
  if n_single:
    _, top = jax.lax.top_k(jnp.where(taken, -jnp.inf, single_BxV), n_single)
    taken = taken.at[rows, top].set(True)
    parts.append(top)
  _, rest = jax.lax.top_k(jnp.where(taken, -jnp.inf, double_BxV), k - 1 - n_single)
  return jnp.concatenate(parts + [rest], axis=1).astype(jnp.int32)


def _supports(model, tokens_BxL, i_B, j_B, attention_BxL, top_k):
  """(support_i, support_j, true_i, true_j, doubly masked logits at i and j [B, V] each, and
  whether the true tokens had to be forced into their top-K supports [B, 2])."""
  batch, vocab = tokens_BxL.shape[0], model.cfg.vocab_size
  rows = jnp.arange(batch)
  x_i, x_j = tokens_BxL[rows, i_B], tokens_BxL[rows, j_B]
  both = _mask_pair(tokens_BxL, i_B, j_B, vocab)
  pos_Bx2 = jnp.stack([i_B, j_B], axis=1)
  if top_k is None:
    double = _logits_at(model, both, pos_Bx2, jnp.full((batch,), 2.0), attention_BxL)
    full = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (batch, vocab))
    return full, full, x_i, x_j, double[:, 0], double[:, 1], jnp.zeros((batch, 2), bool)
  only_i = tokens_BxL.at[rows, i_B].set(vocab)
  only_j = tokens_BxL.at[rows, j_B].set(vocab)
  out = _logits_at(model, jnp.concatenate([both, only_i, only_j]), jnp.tile(pos_Bx2, (3, 1)),
                   jnp.repeat(jnp.asarray([2.0, 1.0, 1.0]), batch), jnp.tile(attention_BxL, (3, 1)))
  double, single_i, single_j = out[:batch], out[batch:2 * batch, 0], out[2 * batch:, 1]
  support_i = _candidates(x_i, single_i, double[:, 0], top_k)
  support_j = _candidates(x_j, single_j, double[:, 1], top_k)
  # Without forcing, the doubly masked argmax would take the truth's place in the slate.
  forced = jnp.stack([
      ~jnp.any(_candidates(jnp.argmax(d, -1), s, d, top_k) == x[:, None], axis=1)
      for x, s, d in ((x_i, single_i, double[:, 0]), (x_j, single_j, double[:, 1]))], axis=1)
  zero = jnp.zeros((batch,), jnp.int32)
  return support_i, support_j, zero, zero, double[:, 0], double[:, 1], forced


def _gather(logits_BxKxV, support_BxS):
  return jnp.take_along_axis(logits_BxKxV, support_BxS[:, None, :], axis=-1)


@functools.partial(nnx.jit, static_argnames=("top_k", "chunk"))
def _tables(model, tokens_BxL, i_B, j_B, attention_BxL, top_k, chunk):
  support_i, support_j, true_i, true_j, double_i, double_j, forced = _supports(
      model, tokens_BxL, i_B, j_B, attention_BxL, top_k)
  both = _mask_pair(tokens_BxL, i_B, j_B, model.cfg.vocab_size)
  # x_i masked, x_j = b: logits at i, [B, C, V] -> [B, C, A] -> [B, A, C].
  logit_i = _gather(substituted_logits(model, both, i_B, j_B, support_j, attention_BxL, chunk),
                    support_i).transpose(0, 2, 1)
  logit_j = _gather(substituted_logits(model, both, j_B, i_B, support_i, attention_BxL, chunk),
                    support_j)
  return PairTables(support_i, support_j, true_i, true_j, logit_i, logit_j,
                    jnp.take_along_axis(double_i, support_i, axis=1),
                    jnp.take_along_axis(double_j, support_j, axis=1), forced)


def pair_tables(model, tokens_BxL, i_B, j_B, *, top_k: Optional[int] = None,
                token_mask_BxL=None, chunk: int = DEFAULT_CHUNK) -> PairTables:
  """The denoiser's conditional tables for the pairs (i_B[b], j_B[b]) of the rows of tokens_BxL,
  over the full vocabulary (top_k None) or top-K supports (see the module docstring). Checked on
  the host before anything compiles."""
  tokens, i_B, j_B, attention = check_pairs(model, tokens_BxL, i_B, j_B, top_k, token_mask_BxL)
  return _tables(model, tokens, i_B, j_B, attention, top_k, int(chunk))


# ----------------------------------------------------------------------------- one construction


class Joint(NamedTuple):
  """One construction's joint: log p [B, A, C] over support_i x support_j, and where the truth
  is in them."""

  log_joint: jax.Array
  support_i: jax.Array
  support_j: jax.Array
  true_i: jax.Array
  true_j: jax.Array


def _hcb_from_row(log_cond_i_BxAxC, log_row_j_Bx1xC, pivot_B):
  """HCB from q_{i|j} and the single row q_{j|i}(.|a*) (all it needs of the other table)."""
  idx = jnp.broadcast_to(pivot_B[:, None, None], log_row_j_Bx1xC.shape)
  return normalize_joint(log_cond_i_BxAxC - jnp.take_along_axis(log_cond_i_BxAxC, idx, axis=1)
                         + log_row_j_Bx1xC)


@functools.partial(nnx.jit, static_argnames=("construction", "top_k", "chunk", "ag_iterations",
                                             "ag_tol"))
def _one_joint(model, tokens_BxL, i_B, j_B, attention_BxL, construction, top_k, chunk,
               ag_iterations, ag_tol):
  support_i, support_j, true_i, true_j, double_i, double_j, _ = _supports(
      model, tokens_BxL, i_B, j_B, attention_BxL, top_k)
  marg_i = jnp.take_along_axis(double_i, support_i, axis=1)
  found = functools.partial(Joint, support_i=support_i, support_j=support_j, true_i=true_i,
                            true_j=true_j)
  if construction == "unary":
    marg_j = jnp.take_along_axis(double_j, support_j, axis=1)
    return found(unary_joint(jax.nn.log_softmax(marg_i), jax.nn.log_softmax(marg_j)))
  both = _mask_pair(tokens_BxL, i_B, j_B, model.cfg.vocab_size)
  logit_i = _gather(substituted_logits(model, both, i_B, j_B, support_j, attention_BxL, chunk),
                    support_i).transpose(0, 2, 1)
  log_cond_i = jax.nn.log_softmax(logit_i, axis=-2)
  if construction == "hcb":  # one substitution of x_i (the pivot) instead of all of them
    pivot = jnp.argmax(marg_i, axis=-1)
    pivot_token = jnp.take_along_axis(support_i, pivot[:, None], axis=1)
    row = _gather(substituted_logits(model, both, j_B, i_B, pivot_token, attention_BxL, chunk),
                  support_j)
    return found(_hcb_from_row(log_cond_i, jax.nn.log_softmax(row, axis=-1), pivot))
  logit_j = _gather(substituted_logits(model, both, j_B, i_B, support_i, attention_BxL, chunk),
                    support_j)
  if construction == "mrf_logit":
    return found(mrf_joint(logit_i, logit_j))
  log_cond_j = jax.nn.log_softmax(logit_j, axis=-1)
  if construction == "mrf":
    return found(mrf_joint(log_cond_i, log_cond_j))
  return found(ag_joint(log_cond_i, log_cond_j, ag_iterations, ag_tol))


def construction_joint(model, tokens_BxL, i_B, j_B, construction: str = "ag", *,
                       top_k: Optional[int] = None, token_mask_BxL=None,
                       chunk: int = DEFAULT_CHUNK, ag_iterations: int = AG_ITERATIONS,
                       ag_tol: float = AG_TOL) -> Joint:
  """One construction's joint, computing only the forward passes it needs: unary the doubly
  masked pass; hcb the table of x_i given each x_j and one row of x_j given the pivot; mrf,
  mrf_logit and ag both tables (plus the candidate passes under top-K)."""
  if construction not in CONSTRUCTIONS:
    raise ValueError(f"construction={construction!r}; choose one of {', '.join(CONSTRUCTIONS)}.")
  _check_positive("ag_iterations", ag_iterations)
  tokens, i_B, j_B, attention = check_pairs(model, tokens_BxL, i_B, j_B, top_k, token_mask_BxL)
  return _one_joint(model, tokens, i_B, j_B, attention, construction, top_k, int(chunk),
                    int(ag_iterations), float(ag_tol))


# ----------------------------------------------------------------------------- the AR reference


def _ar_scores(ar_model, tokens_BxL, i_B, j_B, support_i_BxA, support_j_BxC, attention_BxL,
               chunk):
  """[B, A, C]: log p_AR(x_i = a, x_{i+1..j-1}, x_j = b | x_{<i}), one causal pass per a."""
  batch, length = tokens_BxL.shape
  values_NxBxc, k = _chunks(support_i_BxA, chunk)
  c = values_NxBxc.shape[-1]
  hit_BxL = jnp.arange(length)[None, :] == i_B[:, None]
  target_pos = jnp.arange(1, length)[None, :]
  on_path_BxL1 = (target_pos >= i_B[:, None]) & (target_pos <= j_B[:, None] - 1)
  attention = jnp.repeat(attention_BxL, c, axis=0)

  def one(vals_Bxc):
    rows = jnp.where(hit_BxL[:, None, :], vals_Bxc[:, :, None], tokens_BxL[:, None, :])
    rows = rows.reshape(batch * c, length)
    logp = jax.nn.log_softmax(ar_model(rows, token_mask_BxL=attention, causal=True), axis=-1)
    target = jnp.take_along_axis(logp[:, :-1], rows[:, 1:, None], axis=-1)[..., 0]
    path = jnp.sum(jnp.where(jnp.repeat(on_path_BxL1, c, axis=0), target, 0.0), axis=-1)
    last = jnp.take_along_axis(logp, jnp.repeat(j_B - 1, c)[:, None, None], axis=1)[:, 0]
    last = jnp.take_along_axis(last, jnp.repeat(support_j_BxC, c, axis=0), axis=-1)
    return (path[:, None] + last).reshape(batch, c, -1)

  out = jax.lax.map(one, values_NxBxc)
  return out.transpose(1, 0, 2, 3).reshape(batch, -1, out.shape[-1])[:, :k]


@functools.partial(nnx.jit, static_argnames=("chunk",))
def _ar_joint(ar_model, tokens_BxL, i_B, j_B, support_i, support_j, attention_BxL, chunk):
  return normalize_joint(_ar_scores(ar_model, tokens_BxL, i_B, j_B, support_i, support_j,
                                    attention_BxL, chunk))


def ar_pair_joint(ar_model, tokens_BxL, i_B, j_B, support_i_BxA=None, support_j_BxC=None, *,
                  token_mask_BxL=None, chunk: int = DEFAULT_CHUNK):
  """The AR model's exact log p(x_i = a, x_j = b | x_{<j} without x_i) [B, A, C], renormalised
  over the supports (all V tokens by default), for pairs whose j is the last real position of its
  row and 1 <= i < j: the same tokens a denoiser conditions on for that pair."""
  if ar_model.cfg.kind != "ar":
    raise ValueError(f"the reference joint needs an AR model (kind 'ar'); got kind "
                     f"{ar_model.cfg.kind!r}.")
  tokens, i_B, j_B, attention = _check_positions(ar_model, tokens_BxL, i_B, j_B, token_mask_BxL)
  last = attention.sum(axis=1) - 1
  bad = np.flatnonzero((j_B != last) | (i_B < 1) | (i_B >= j_B))
  if bad.size:
    b = int(bad[0])
    raise ValueError(f"pair {b} (i={i_B[b]}, j={j_B[b]}): the AR reference needs 1 <= i < j and j "
                     f"= the last real position of the row ({last[b]}); only there does the AR "
                     "model condition on the same tokens as the denoiser.")
  vocab = ar_model.cfg.vocab_size
  full = np.broadcast_to(np.arange(vocab, dtype=np.int32), (len(i_B), vocab))
  support_i = full if support_i_BxA is None else np.asarray(support_i_BxA, np.int32)
  support_j = full if support_j_BxC is None else np.asarray(support_j_BxC, np.int32)
  return _ar_joint(ar_model, tokens, i_B, j_B, support_i, support_j, attention, int(chunk))


# ----------------------------------------------------------------------------- checks


def _check_positive(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be an integer >= 1.")


def check_top_k(top_k, vocab_size: int) -> None:
  """None (exact) or 2 <= top_k <= V."""
  if top_k is None:
    return
  if not isinstance(top_k, (int, np.integer)) or not 2 <= top_k <= vocab_size:
    raise ValueError(f"top_k={top_k!r} must lie in [2, V = {vocab_size}] (a support of one token "
                     "makes every joint trivially 1); pass top_k=null for the exact joints over "
                     f"all {vocab_size} tokens, or e.g. top_k=50 for the paper's restricted "
                     "support.")


def _check_positions(model, tokens_BxL, i_B, j_B, token_mask_BxL):
  tokens = np.asarray(tokens_BxL)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be integer ids of shape [batch, length]; got {tokens.shape}.")
  batch, length = tokens.shape
  if length > model.cfg.max_seq_len:
    raise ValueError(f"rows of length {length} exceed the model's max_seq_len="
                     f"{model.cfg.max_seq_len}.")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size):
    raise ValueError(f"token ids must lie in [0, {model.cfg.vocab_size}) (clean text: the pair's "
                     "positions are masked here, not by the caller).")
  i_B = np.broadcast_to(np.asarray(i_B), (batch,)).astype(np.int32)
  j_B = np.broadcast_to(np.asarray(j_B), (batch,)).astype(np.int32)
  attention = (np.ones((batch, length), bool) if token_mask_BxL is None
               else np.asarray(token_mask_BxL, bool))
  for b in range(batch):
    i, j = int(i_B[b]), int(j_B[b])
    if not (0 <= i < length and 0 <= j < length):
      raise ValueError(f"pair {b}: positions (i={i}, j={j}) out of range for rows of length "
                       f"{length}; positions lie in [0, {length - 1}].")
    if i == j:
      raise ValueError(f"pair {b}: i = j = {i}; a joint needs two distinct positions.")
    if not (attention[b, i] and attention[b, j]):
      raise ValueError(f"pair {b}: position {i if not attention[b, i] else j} is padding; choose "
                       "real tokens.")
  return tokens.astype(np.int32), i_B, j_B, attention


def check_pairs(model, tokens_BxL, i_B, j_B, top_k, token_mask_BxL=None):
  """Host-side checks before anything compiles: a bidirectional denoiser, positions in range and
  distinct (and real tokens), a valid top_k. Returns (tokens, i, j, attention) as numpy."""
  if model.cfg.kind != "denoiser":
    raise ValueError(f"joints are derived from a bidirectional denoiser (model kind 'denoiser'); "
                     f"got kind {model.cfg.kind!r}. An AR model has an exact joint already: use it "
                     "as the reference (ar_pair_joint, or ar_run= on the command line).")
  check_top_k(top_k, model.cfg.vocab_size)
  return _check_positions(model, tokens_BxL, i_B, j_B, token_mask_BxL)


# ----------------------------------------------------------------------------- per-pair figures


@functools.partial(jax.jit, static_argnames=("ag_iterations", "ag_tol"))
def pair_figures(tables: PairTables, ar_log_joint=None, ag_iterations: int = AG_ITERATIONS,
                 ag_tol: float = AG_TOL) -> dict:
  """Per-pair figures of every construction from the tables (see evaluate_pairs), compiled."""
  log_cond_i, log_cond_j = tables.log_cond_i(), tables.log_cond_j()
  ti, tj = tables.true_i, tables.true_j
  joints, steps = tables.joints(ag_iterations, ag_tol, return_ag_steps=True)
  out = {name: pair_metrics(j, log_cond_i, log_cond_j, ti, tj) for name, j in joints.items()}
  out["ag"]["iterations"] = steps.astype(jnp.float32)
  out["conditionals"] = {"nll_unary": -(_at(log_cond_i, ti, tj) + _at(log_cond_j, ti, tj)),
                         "truth_forced": jnp.any(tables.forced, axis=1).astype(jnp.float32)}
  if ar_log_joint is not None:
    out["ar"] = pair_metrics(ar_log_joint, log_cond_i, log_cond_j, ti, tj)
    for name, joint in joints.items():
      out[name]["kl_to_ar"] = _kl(ar_log_joint, joint, (-2, -1))
  return out


def evaluate_pairs(model, tokens_BxL, i_B, j_B, *, top_k: Optional[int] = None,
                   token_mask_BxL=None, ar_model=None, ag_iterations: int = AG_ITERATIONS,
                   ag_tol: float = AG_TOL, chunk: int = DEFAULT_CHUNK) -> dict:
  """{construction: {metric: [B] numpy}} for every construction, plus "conditionals" (the model's
  own unary NLL, and "truth_forced": top-K had to put x_i or x_j in its support) and, with
  `ar_model`, "ar" (its exact joint's figures) and each construction's
  "kl_to_ar" = KL(p_AR || p) over the support; "ag" also has its "iterations"."""
  _check_positive("ag_iterations", ag_iterations)
  tables = pair_tables(model, tokens_BxL, i_B, j_B, top_k=top_k, token_mask_BxL=token_mask_BxL,
                       chunk=chunk)
  ar = None
  if ar_model is not None:
    ar = ar_pair_joint(ar_model, tokens_BxL, i_B, j_B, tables.support_i, tables.support_j,
                       token_mask_BxL=token_mask_BxL, chunk=chunk)
  return jax.tree.map(np.asarray, pair_figures(tables, ar, int(ag_iterations), float(ag_tol)))


# ----------------------------------------------------------------------------- pairs of a split


def held_out_windows(data_cfg, tokenizer, split: str, count: int, seed: int,
                     cache_dir: Optional[str]) -> np.ndarray:
  """Up to `count` full windows [N, L] of a split (no padding), in a seeded shuffled order."""
  ds = data_lib.build_dataset(data_cfg, tokenizer, split=split, batch_size=8, seed=seed,
                              cache_dir=cache_dir, shuffle=True, num_epochs=1)
  rows = []
  for batch in ds:
    full = np.asarray(batch["token_mask"], bool).all(axis=1)
    rows.extend(np.asarray(batch["tokens"])[full])
    if len(rows) >= count:
      break
  if not rows:
    raise ValueError(f"The {split} split has no full window of data.seq_len={data_cfg.seq_len} "
                     "tokens; use a larger corpus or a shorter data.seq_len.")
  return np.stack(rows[:count]).astype(np.int32)


def _pair_in(row_L, kind: str, rng, special: set, given):
  """(i, j) of `kind` in one window, avoiding special tokens, or None when the window has none."""
  length = len(row_L)
  ok = np.asarray([int(t) not in special for t in row_L])
  last = length - 1
  if kind == "positions":
    return given
  if kind == "adjacent":
    starts = np.flatnonzero(ok[:-1] & ok[1:])
    if not starts.size:
      return None
    start = int(rng.choice(starts))
    return start, start + 1
  if kind == "adjacent_end":
    return (last - 1, last) if ok[last] and ok[last - 1] else None
  if kind == "distant_end":
    firsts = np.flatnonzero(ok[1:last - 1]) + 1
    return None if not (ok[last] and firsts.size) else (int(rng.choice(firsts)), last)
  real = np.flatnonzero(ok)
  for _ in range(100):  # distant: uniform over unordered pairs at distance >= 2
    a, b = sorted(int(x) for x in rng.choice(real, 2, replace=False))
    if b - a >= 2:
      return a, b
  return None


def sample_pairs(windows_NxL, kind: str, num_pairs: int, seed: int, special_ids=(),
                 positions=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(window index, i, j) of up to num_pairs pairs of `kind` (PAIR_KINDS), one per window, i < j
  for the sampled kinds; `positions` are used in turn for kind "positions"."""
  rng = np.random.default_rng([seed, list(PAIR_KINDS).index(kind)])
  special = {int(s) for s in special_ids}
  picked = []
  for n, row in enumerate(windows_NxL):
    given = tuple(positions[len(picked) % len(positions)]) if positions else None
    pair = _pair_in(row, kind, rng, special, given)
    if pair is not None:
      picked.append((n,) + tuple(pair))
    if len(picked) == num_pairs:
      break
  if not picked:
    raise ValueError(f"no window of the split holds a pair of kind {kind!r} without special "
                     "tokens.")
  return tuple(np.asarray(col, np.int32) for col in zip(*picked))


def _mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
  return float(x.mean()), se


def summarize(per_pair: dict) -> dict:
  """Mean and standard error of every metric; P-PPL and U-PPL per token from the mean NLLs."""
  out = {}
  for name, metrics in per_pair.items():
    row = {}
    for metric, values in metrics.items():
      row[metric], row[metric + "_se"] = _mean_se(values)
    if "iterations" in metrics:
      row["iterations_max"] = float(np.max(metrics["iterations"]))
    if "nll_pair" in row:
      row["p_ppl"] = math.exp(row["nll_pair"] / 2)
    row["u_ppl"] = math.exp(row["nll_unary"] / 2)
    out[name] = row
  return out


# ----------------------------------------------------------------------------- the CLI


@dataclass
class JointsConfig:
  """`python -m mdlm.joints run=<denoiser run> [key=value ...]` (see the module docstring).

  kinds: pair kinds (adjacent, distant, adjacent_end, distant_end), num_pairs of each, one per
  held-out window. positions: explicit [i, j] pairs instead (used in turn over the windows).
  top_k: null for the exact joints over all V tokens, else the paper's K-candidate support.
  ar_run: an AR run with the same tokenizer: its exact joint is the reference on pairs that end
  the window (the *_end kinds). batch_size pairs per forward batch; chunk substitutions per pass."""

  run: str = "???"
  ar_run: Optional[str] = None
  split: str = "val"
  ema: bool = True
  step: Optional[int] = None
  kinds: List[str] = field(default_factory=lambda: ["adjacent", "distant"])
  positions: List[List[int]] = field(default_factory=list)
  num_pairs: int = 64
  top_k: Optional[int] = None
  ag_iterations: int = AG_ITERATIONS   # the most; AG stops once converged (ag_tol)
  ag_tol: float = AG_TOL
  batch_size: int = 4
  chunk: int = DEFAULT_CHUNK
  seed: int = 0
  output: Optional[str] = None   # default <run>/joints_<split>[_top<K>].json (+ .md)


def _ar_applies(kind: str, pairs, seq_len: int) -> bool:
  if kind in ("adjacent_end", "distant_end"):
    return True
  return kind == "positions" and all(j == seq_len - 1 and 1 <= i < j for i, j in pairs)


def _check_config(jcfg: JointsConfig, seq_len: int) -> list[str]:
  """The kinds to score, after checking every value that needs no weights."""
  if jcfg.split not in ("train", "val"):
    raise ValueError(f"split={jcfg.split!r}; choose val or train.")
  for name in ("num_pairs", "batch_size", "chunk", "ag_iterations"):
    _check_positive(name, getattr(jcfg, name))
  if not jcfg.ag_tol >= 0:
    raise ValueError(f"ag_tol={jcfg.ag_tol} must be >= 0 (0: always run ag_iterations steps).")
  for pair in jcfg.positions:
    if len(pair) != 2 or not all(0 <= int(p) < seq_len for p in pair):
      raise ValueError(f"positions: {list(pair)} must be two positions in [0, {seq_len - 1}] (the "
                       f"run's windows are data.seq_len={seq_len} tokens).")
    if pair[0] == pair[1]:
      raise ValueError(f"positions: {list(pair)} has i = j; a joint needs two distinct positions.")
  kinds = ["positions"] if jcfg.positions else list(jcfg.kinds)
  if not kinds or any(k not in PAIR_KINDS for k in kinds) or (
      "positions" in kinds and not jcfg.positions):
    raise ValueError(f"kinds={list(jcfg.kinds)}; choose from adjacent, distant, adjacent_end, "
                     "distant_end (or give positions=[[i,j],...]).")
  if jcfg.ar_run and not any(_ar_applies(k, jcfg.positions, seq_len) for k in kinds):
    raise ValueError("ar_run is an exact reference only for pairs that end the window: add "
                     "kinds=[adjacent_end,distant_end] (or positions with j = data.seq_len - 1).")
  return kinds


def _check_denoiser_run(run: RunDir, cfg) -> None:
  """A bidirectional denoiser run: not an AR model, nor a head trained over given runs."""
  trained = cfg.objective
  if cfg.model.kind != "denoiser" or objectives.get(trained.name).given_runs(trained):
    raise ValueError(f"{run.path} is not a bidirectional denoiser run (model.kind="
                     f"{cfg.model.kind}, objective={trained.name}); derive joints from a denoiser "
                     "run, and pass an AR run as ar_run= for the exact reference.")


def _check_ar_run(path: str, run: RunDir, cfg, tokenizer) -> None:
  """An AR run with the denoiser run's tokenizer and a context that holds its windows."""
  ar_run, _ = RunDir.find(path)
  ar_cfg = ar_run.load_config()
  if ar_cfg.model.kind != "ar":
    raise ValueError(f"ar_run={ar_run.path} has model.kind={ar_cfg.model.kind}; the reference must "
                     "be an AR run (python -m mdlm.train model=ar ...).")
  if data_lib.load_tokenizer(ar_run.tokenizer_dir).fingerprint != tokenizer.fingerprint:
    raise ValueError(f"ar_run={ar_run.path} has another tokenizer than {run.path}; train the AR "
                     "run with the same tokenizer and data.")
  if ar_cfg.model.max_seq_len < cfg.data.seq_len:
    raise ValueError(f"ar_run's max_seq_len={ar_cfg.model.max_seq_len} is shorter than the "
                     f"windows (data.seq_len={cfg.data.seq_len}).")


def _score_kind(jcfg, model, ar_model, windows_NxL, kind, special_ids) -> dict:
  """Per-pair figures of one kind, batch by batch; with the wall time they took."""
  rows, i_N, j_N = sample_pairs(windows_NxL, kind, jcfg.num_pairs, jcfg.seed, special_ids,
                                [tuple(p) for p in jcfg.positions])
  use_ar = ar_model if _ar_applies(kind, jcfg.positions, windows_NxL.shape[1]) else None
  parts, start = [], time.perf_counter()
  for s in range(0, len(rows), jcfg.batch_size):
    sl = slice(s, s + jcfg.batch_size)
    parts.append(evaluate_pairs(model, windows_NxL[rows[sl]], i_N[sl], j_N[sl], top_k=jcfg.top_k,
                                ar_model=use_ar, ag_iterations=jcfg.ag_iterations,
                                ag_tol=jcfg.ag_tol,
                                chunk=jcfg.chunk))
  seconds = time.perf_counter() - start
  per_pair = jax.tree.map(lambda *x: np.concatenate(x), *parts)
  return {"description": PAIR_KINDS[kind], "pairs": int(len(rows)),
          "mean_distance": float(np.mean(j_N - i_N)), "seconds": seconds,
          "seconds_per_1000_pairs": 1000.0 * seconds / len(rows),
          "ar_reference": use_ar is not None,
          "figures": summarize(per_pair),
          "per_pair": {name: {k: v.tolist() for k, v in m.items()} for name, m in per_pair.items()}}


def run_joints(jcfg: JointsConfig) -> dict:
  """Scores a denoiser run's derived joints on held-out pairs; writes and returns the record."""
  run, _ = RunDir.find(jcfg.run)
  cfg = run.load_config()
  kinds = _check_config(jcfg, cfg.data.seq_len)  # everything is refused before weights load
  _check_denoiser_run(run, cfg)
  tokenizer = data_lib.load_tokenizer(run.tokenizer_dir)
  check_top_k(jcfg.top_k, tokenizer.vocab_size)
  if jcfg.ar_run:
    _check_ar_run(jcfg.ar_run, run, cfg, tokenizer)
  loaded = load_run(jcfg.run, ema=jcfg.ema, step=jcfg.step)
  ar_model = load_run(jcfg.ar_run, ema=jcfg.ema).model if jcfg.ar_run else None
  windows = held_out_windows(cfg.data, tokenizer, jcfg.split, 4 * jcfg.num_pairs, jcfg.seed,
                             cfg.data.cache_dir or run.data_cache_dir)
  special = [getattr(tokenizer, n) for n in ("bos_id", "eos_id", "pad_id")]
  vocab = tokenizer.vocab_size
  record = {"run": loaded.run_dir, "step": loaded.step, "ar_run": jcfg.ar_run, "split": jcfg.split,
            "vocab_size": vocab, "support": jcfg.top_k or vocab, "exact": jcfg.top_k is None,
            "ag_iterations": jcfg.ag_iterations, "ag_tol": jcfg.ag_tol,
            "config": OmegaConf.to_container(OmegaConf.structured(jcfg)),
            "kinds": {k: _score_kind(jcfg, loaded.model, ar_model, windows, k, special)
                      for k in kinds}}
  suffix = "" if jcfg.top_k is None else f"_top{jcfg.top_k}"
  output = jcfg.output or run.join(f"joints_{jcfg.split}{suffix}.json")
  with open(output, "w") as f:
    json.dump(record, f, indent=1)
  with open(os.path.splitext(output)[0] + ".md", "w") as f:
    f.write(format_table(record))
  record["output"] = output
  return record


ROW_LABELS = {"unary": "unary (both masked, independent)", "mrf": "MRF (product of conditionals)",
              "mrf_logit": "MRF, logits", "hcb": "HCB (pivot: doubly masked argmax)",
              "ag": "AG (closest conditionals)", "conditionals": "the model's own conditionals",
              "ar": "AR model, exact joint (reference)"}


def number(x: float) -> str:
  """Three decimals, or three significant digits below 0.01 (KLs of near-consistent joints)."""
  return f"{x:.3f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"


def _cell(row: dict, metric: str, ppl: Optional[str] = None) -> str:
  if metric not in row:
    return "-"
  text = f"{number(row[metric])} ± {number(row[metric + '_se'])}"
  return f"{row[ppl]:.2f} ({text})" if ppl else text


def format_table(record: dict) -> str:
  """The markdown table of a record: one section per pair kind."""
  support = "exact, all" if record["exact"] else f"top-{record['support']} of"
  lines = [f"# Derived two-token joints: {record['run']} (step {record['step']})", "",
           f"Support: {support} {record['vocab_size']} tokens per position; AG iterated until no "
           f"marginal moves by {record['ag_tol']:g} (at most {record['ag_iterations']} "
           "iterations). P-PPL / U-PPL per token (mean NLL per pair ± "
           "s.e. in nats); KL in nats, the model's conditionals against the joint's (all: mean "
           "over every conditioning value; true: at the true tokens).", ""]
  for kind, res in record["kinds"].items():
    ag, forced = res["figures"]["ag"], res["figures"]["conditionals"]["truth_forced"]
    slate = ("" if record["exact"] else f"; the truth was forced into the top-{record['support']}"
             f" support for {100 * forced:.0f}% of pairs (a uniform joint over it: P-PPL "
             f"{record['support']})")
    lines += [f"## {kind} ({res['description']}): {res['pairs']} pairs, mean distance "
              f"{res['mean_distance']:.1f}; {res['seconds_per_1000_pairs']:.0f} s per 1,000 pairs "
              "(wall, with compiling); "
              f"AG took {ag['iterations']:.0f} iterations on average (max "
              f"{ag['iterations_max']:.0f}){slate}",
              "", "| joint | P-PPL (pair NLL) | U-PPL (unary NLL) | KL (all) | KL (true) |"
              + (" KL(AR ‖ joint) |" if res["ar_reference"] else ""),
              "|---|---|---|---|---|" + ("---|" if res["ar_reference"] else "")]
    for name in ROW_LABELS:
      if name not in res["figures"]:
        continue
      row = res["figures"][name]
      cells = [_cell(row, "nll_pair", "p_ppl"), _cell(row, "nll_unary", "u_ppl"),
               _cell(row, "kl_all"), _cell(row, "kl_true")]
      if res["ar_reference"]:
        cells.append(_cell(row, "kl_to_ar"))
      lines.append(f"| {ROW_LABELS[name]} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def register_configs() -> None:
  ConfigStore.instance().store(name="base_joints", node=JointsConfig)


def _hydra_main():
  register_configs()

  @hydra.main(version_base=None, config_path=cli.CONFIG_DIR, config_name="joints")
  def main(hydra_cfg) -> None:
    cli.setup_logging()
    try:
      jcfg = OmegaConf.to_object(hydra_cfg)
      if jcfg.run in (None, "", "???"):
        raise ValueError("pass run=<denoiser run directory or checkpoint directory>")
      record = run_joints(jcfg)
    except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
      raise SystemExit(f"mdlm.joints: {e}")
    print(format_table(record))
    print(f"wrote {record['output']} and {os.path.splitext(record['output'])[0]}.md")

  main()


if __name__ == "__main__":
  _hydra_main()
