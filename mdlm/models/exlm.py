"""ExLM: each [MASK] of the input expanded into k states joined by a transition DAG.

Zheng, Yang, Liang, Feng, Liu, Ju, Xiao and Zhang 2025, "ExLM: Rethinking the Impact of [MASK]
Tokens in Masked Language Models" (ICML), whose states alignment is the dynamic program of Huang,
Zhou, Zhou, Li and Huang 2022, "Directed Acyclic Transformer for Non-Autoregressive Machine
Translation" (DA-Transformer). The objective is mdlm.objectives.exlm; this module holds the model
and the dynamic programs. What is implemented, and where we chose:

Input (as the paper and its released code). Each scored [MASK] position i of a row becomes k
consecutive copies of the mask token (k = ModelConfig.exlm_states; 4 is the released code's
default `--ext-state-num` and the value of its pre-training command); other tokens stay single.
A row with m masks has L + (k-1) m slots; rows are right-padded (key-masked) to a static
L + (k-1) cap. Every slot carries a 2D
rotary position (p, s): p = its original position, s = 1..k for the states of a [MASK], 0 for an
ordinary token (the code's convention); `transformer.rotary_2d` rotates half of each head by p
and half by s. The states differ only through s, the rotary position.

States and transitions. The vertices of the DAG are the k m states, in slot order (state s of
the j-th [MASK] is vertex j k + s). A transition u -> v is scored as DA-Transformer's links, from
the final hidden states h: per head c, a query and key projection, log_softmax over the allowed v
of q_c(h_u) . k_c(h_v) / sqrt(d_c), mixed over heads by a per-u gate softmax(W_g h_u). Allowed
(ModelConfig.exlm_links): "dense", any later state (v > u, the paper's forward-only DAG over all
expanded states, as in its code); "adjacent", only the states of the next [MASK]. Choices: the
code also concatenates a learned embedding of the slot index to h before the projections; we use
h alone (the rotary positions already reach it). The code anchors every path at the expanded BOS
and EOS tokens; our windows need not hold them, so a path starts at a state of the first [MASK]
(distribution softmax(w . h) over those k states, w learned) and must end at a state of the last.

Loss (the paper's states alignment). The targets Y = y_0..y_{m-1} are the masked tokens in order;
a path a_0 < ... < a_{m-1} emits y_j from state a_j with the output head's softmax, and

  P(Y) = sum over allowed paths of start(a_0) prod_j E(a_{j-1}, a_j) prod_j p(y_j | h_{a_j}),

summed by the forward recursion f_j(v) = p(y_j | v) sum_u f_{j-1}(u) E(u, v) in log space
(`dag_log_likelihood`, lax.scan over j). With "adjacent" links the paths are one state per [MASK]
and P is a normalised distribution over V^m (an HMM); with "dense" links paths may end elsewhere,
and sum_Y P(Y) = Z < 1 (DA-Transformer's loss, which also trains Z towards 1).

Inference (our choice: the paper evaluates ExLM by fine-tuning the encoder and defines no
read-out of [MASK] predictions that we found; nor does its code). The prediction for the j-th
[MASK] is the model's marginal of y_j: the mixture over states u of
p(. | h_u), weighted by P(a_j = u | a valid path), from a forward and a backward pass over the
transitions alone (`dag_state_marginals`). These per-position distributions are what __call__
returns at masked positions (the plain head elsewhere), so every measure and sampler that calls a
denoiser works unchanged. The expansion needs a static bound on the [MASK]s per row: __call__
compiles one branch per cap in `expansion_caps(L)` and runs the smallest that fits (lax.switch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdlm.config import ModelConfig
from mdlm.models.transformer import EMBED, HEADS, KV, Transformer

NEG = -1e30  # a finite log 0: logsumexp over all -inf would give NaN gradients


def expansion_caps(length: int) -> tuple[int, ...]:
  """The static caps on [MASK]s per row that the readout compiles for: L/4, L/2 and L, rounded
  up (at L = 128, masked15 runs the L/4 branch, masked40 L/2, masked80 L)."""
  return tuple(sorted({max(1, -(-length // 2 ** i)) for i in range(3)}))


class Layout(NamedTuple):
  """Where everything of the expanded rows is (T = L + (k - 1) cap slots, N = k cap vertices)."""

  tokens_BxT: jax.Array
  positions_BxTx2: jax.Array   # (original position, state index: 1..k, 0 for plain tokens)
  key_mask_BxT: jax.Array      # real slots of real tokens (padding and the tail are False)
  first_slot_BxL: jax.Array    # the slot of each original position (its first state)
  masked_pos_BxM: jax.Array    # the original position of the j-th [MASK] (M = cap)
  vertex_slot_BxN: jax.Array   # the slot of vertex j k + s
  count_B: jax.Array           # [MASK]s per row (<= cap)


def expand_layout(tokens_BxL, scored_BxL, key_mask_BxL, states: int, cap: int) -> Layout:
  """The expanded input: each scored position repeated `states` times, the rest once. The caller
  guarantees at most `cap` scored positions per row."""
  batch, length = tokens_BxL.shape
  scored = jnp.asarray(scored_BxL, bool)
  width_BxL = jnp.where(scored, states, 1)
  first_BxL = jnp.cumsum(width_BxL, axis=1) - width_BxL
  total = length + (states - 1) * cap
  slot_T = jnp.arange(total)
  # Comparisons rather than searchsorted / argsort: [B, T, L] booleans compile and run faster.
  orig_BxT = jnp.sum(first_BxL[:, None, :] <= slot_T[None, :, None], axis=2) - 1
  orig_BxT = jnp.clip(orig_BxT, 0, length - 1)
  state_BxT = slot_T[None, :] - jnp.take_along_axis(first_BxL, orig_BxT, axis=1)
  real_BxT = slot_T[None, :] < jnp.sum(width_BxL, axis=1, keepdims=True)
  is_state_BxT = jnp.take_along_axis(scored, orig_BxT, axis=1) & real_BxT
  positions = jnp.stack([jnp.where(real_BxT, orig_BxT, 0),
                         jnp.where(is_state_BxT, state_BxT + 1, 0)], axis=-1)
  key_mask = real_BxT
  if key_mask_BxL is not None:
    key_mask = key_mask & jnp.take_along_axis(jnp.asarray(key_mask_BxL, bool), orig_BxT, axis=1)
  seen_BxL = jnp.cumsum(scored, axis=1)  # the j-th [MASK] is where j + 1 have been seen
  masked_pos_BxM = jnp.minimum(
      jnp.sum(seen_BxL[:, None, :] <= jnp.arange(cap)[None, :, None], axis=2), length - 1)
  vertex_BxMxK = (jnp.take_along_axis(first_BxL, masked_pos_BxM, axis=1)[:, :, None]
                  + jnp.arange(states)[None, None, :])
  return Layout(jnp.take_along_axis(jnp.asarray(tokens_BxL), orig_BxT, axis=1), positions,
                key_mask, first_BxL, masked_pos_BxM,
                jnp.minimum(vertex_BxMxK.reshape(batch, cap * states), total - 1),
                jnp.sum(scored, axis=1).astype(jnp.int32))


# ----------------------------------------------------------------------------- the DAG


def vertex_masks(count_B, states: int, cap: int, links: str):
  """(allowed transitions [B, N, N], start vertices [B, N], end vertices [B, N]) of rows with
  count_B [MASK]s: vertex u is state u % k of the (u // k)-th [MASK]."""
  vertex_N = jnp.arange(states * cap)
  j_N = vertex_N // states
  valid_BxN = j_N[None, :] < count_B[:, None]
  if links == "dense":
    order_NxN = vertex_N[:, None] < vertex_N[None, :]
  elif links == "adjacent":
    order_NxN = j_N[None, :] == j_N[:, None] + 1
  else:
    raise ValueError(f"exlm links must be 'dense' or 'adjacent', got {links!r}.")
  allowed = order_NxN[None] & valid_BxN[:, :, None] & valid_BxN[:, None, :]
  return allowed, valid_BxN & (j_N == 0)[None, :], j_N[None, :] == (count_B[:, None] - 1)


def _step_forward(f_BxN, log_links_BxNxN):
  """log sum_u exp(f(u) + E(u, v)) for every v."""
  return jnp.maximum(jax.nn.logsumexp(f_BxN[:, :, None] + log_links_BxNxN, axis=1), NEG)


def dag_log_likelihood(emit_BxMxN, log_links_BxNxN, log_start_BxN, end_BxN, count_B):
  """log P(Y) per row: the sum over paths a_0..a_{m-1} (m = count_B) of
  start(a_0) prod_j E(a_{j-1}, a_j) prod_j emit[j, a_j], with a_{m-1} an end vertex, in log
  space (emit[j, u] = log p(y_j | u); disallowed entries NEG). 0 for rows with m = 0."""
  emit_BxMxN = jnp.asarray(emit_BxMxN, jnp.float32)
  count_B = jnp.asarray(count_B)

  def step(f_BxN, xs):
    j, e_BxN = xs
    new = e_BxN + _step_forward(f_BxN, log_links_BxNxN)
    return jnp.where((j < count_B)[:, None], new, f_BxN), None

  f0 = jnp.maximum(log_start_BxN + emit_BxMxN[:, 0], NEG)
  js = jnp.arange(1, emit_BxMxN.shape[1])
  f_BxN, _ = jax.lax.scan(step, f0, (js, jnp.swapaxes(emit_BxMxN[:, 1:], 0, 1)))
  ll_B = jax.nn.logsumexp(jnp.where(end_BxN, f_BxN, NEG), axis=1)
  return jnp.where(count_B > 0, ll_B, 0.0)


def dag_state_marginals(log_links_BxNxN, log_start_BxN, end_BxN, count_B, cap: int):
  """log P(a_j = u | the path ends at an end vertex) [B, M, N]: forward and backward passes over
  the transitions alone (the emissions of the other targets sum to one)."""
  count_B = jnp.asarray(count_B)

  def forward(a_BxN, _):
    a_BxN = _step_forward(a_BxN, log_links_BxNxN)
    return a_BxN, a_BxN

  _, rest = jax.lax.scan(forward, log_start_BxN, None, length=cap - 1)
  alpha_MxBxN = jnp.concatenate([log_start_BxN[None], rest], axis=0)
  end_log_BxN = jnp.where(end_BxN, 0.0, NEG)

  def backward(b_next_BxN, j):
    spread = jnp.maximum(jax.nn.logsumexp(log_links_BxNxN + b_next_BxN[:, None, :], axis=2), NEG)
    b = jnp.where((j == count_B - 1)[:, None], end_log_BxN,
                  jnp.where((j < count_B - 1)[:, None], spread, NEG))
    return b, b

  _, beta_rev = jax.lax.scan(backward, jnp.full_like(log_start_BxN, NEG),
                             jnp.arange(cap - 1, -1, -1))
  beta_MxBxN = beta_rev[::-1]
  log_z_B = jax.nn.logsumexp(alpha_MxBxN[0] + beta_MxBxN[0], axis=-1)
  log_q = alpha_MxBxN + beta_MxBxN - log_z_B[None, :, None]
  return jnp.maximum(jnp.swapaxes(log_q, 0, 1), NEG)


def mixture_log_probs(log_q_BxMxN, state_logits_BxNxV):
  """log sum_u q(u) softmax(logits_u) [B, M, V] (float32; clamped at 1e-37 before the log)."""
  probs_BxNxV = jax.nn.softmax(jnp.asarray(state_logits_BxNxV, jnp.float32), axis=-1)
  top_BxMx1 = jnp.max(log_q_BxMxN, axis=-1, keepdims=True)
  mix = jnp.einsum("bmn,bnv->bmv", jnp.exp(log_q_BxMxN - top_BxMx1), probs_BxNxV)
  return top_BxMx1 + jnp.log(jnp.maximum(mix, 1e-37))


# ----------------------------------------------------------------------------- the model


def _param(rngs, shape, axes, fan_in=None):
  init = (jax.nn.initializers.zeros if fan_in is None
          else jax.nn.initializers.truncated_normal(1.0 / math.sqrt(fan_in)))
  return nnx.Param(init(rngs.params(), shape, jnp.float32), sharding_names=axes,
                   eager_sharding=False)


class DagOutputs(NamedTuple):
  state_logits_BxNxV: jax.Array
  log_links_BxNxN: jax.Array
  log_start_BxN: jax.Array
  end_BxN: jax.Array


class ExLM(nnx.Module):
  """A Transformer backbone over the expanded input plus the transition head (see the module
  docstring). __call__(tokens, noise_level=None) -> float32 [B, L, V]: the plain head's logits at
  unmasked positions, the log marginals of the DAG at [MASK]s (the denoiser protocol)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    if cfg.exlm_states < 1:
      raise ValueError(f"ExLM needs exlm_states >= 1, got {cfg.exlm_states}.")
    self.cfg = cfg
    self.backbone = Transformer(cfg, rngs=rngs)
    d, h = cfg.d_model, cfg.num_heads
    self.link_q = _param(rngs, (d, h, d // h), (EMBED, HEADS, KV), d)
    self.link_k = _param(rngs, (d, h, d // h), (EMBED, HEADS, KV), d)
    self.link_q_bias = _param(rngs, (h, d // h), (HEADS, KV))
    self.link_k_bias = _param(rngs, (h, d // h), (HEADS, KV))
    self.link_gate = _param(rngs, (d, h), (EMBED, HEADS), d)
    self.link_gate_bias = _param(rngs, (h,), (HEADS,))
    self.start = _param(rngs, (d,), (EMBED,), d)

  @property
  def mask_id(self) -> int:
    return self.cfg.vocab_size

  @property
  def states(self) -> int:
    return self.cfg.exlm_states

  def expanded_hidden(self, tokens_BxL, scored_BxL, cap: int, noise_level_B=None, *,
                      token_mask_BxL=None, dropout_key=None) -> tuple[Layout, jax.Array]:
    """(layout, final hidden states [B, T, D]) of the expanded rows."""
    tokens_BxL = jnp.asarray(tokens_BxL)
    if tokens_BxL.shape[1] > self.cfg.max_seq_len:
      raise ValueError(
          f"Sequence length {tokens_BxL.shape[1]} exceeds the model's max_seq_len="
          f"{self.cfg.max_seq_len}; shorten data.seq_len or build the model with a larger one.")
    lay = expand_layout(tokens_BxL, scored_BxL, token_mask_BxL, self.states, cap)
    hidden = self.backbone.hidden_states(
        lay.tokens_BxT, noise_level_B, token_mask_BxL=lay.key_mask_BxT, dropout_key=dropout_key,
        causal=False, positions=lay.positions_BxTx2)
    return lay, hidden

  def dag_outputs(self, lay: Layout, hidden_BxTxD, cap: int) -> DagOutputs:
    """The states' logits, the log transitions, the log start and the end vertices."""
    h_BxNxD = jnp.take_along_axis(hidden_BxTxD, lay.vertex_slot_BxN[..., None], axis=1)
    allowed, start, end = vertex_masks(lay.count_B, self.states, cap, self.cfg.exlm_links)
    h32 = h_BxNxD.astype(jnp.float32)
    q = jnp.einsum("bnd,dhe->bnhe", h32, self.link_q[...]) + self.link_q_bias[...]
    k = jnp.einsum("bnd,dhe->bnhe", h32, self.link_k[...]) + self.link_k_bias[...]
    score = jnp.einsum("buhe,bvhe->buvh", q, k) / math.sqrt(q.shape[-1])
    score = jnp.where(allowed[..., None], score, NEG)
    log_gate = jax.nn.log_softmax(h32 @ self.link_gate[...] + self.link_gate_bias[...], axis=-1)
    links = jax.nn.logsumexp(jax.nn.log_softmax(score, axis=2) + log_gate[:, :, None, :], axis=-1)
    start_score = jnp.where(start, h32 @ self.start[...], NEG)
    log_start = jnp.where(start, jax.nn.log_softmax(start_score, axis=-1), NEG)
    return DagOutputs(self.backbone.logits(h_BxNxD), jnp.where(allowed, links, NEG), log_start,
                      end)

  def readout(self, tokens_BxL, noise_level_B=None, *, cap: int, token_mask_BxL=None,
              dropout_key=None):
    """[B, L, V]: the head's logits at unmasked positions, log marginals at the <= cap [MASK]s."""
    tokens_BxL = jnp.asarray(tokens_BxL)
    scored = self.scored(tokens_BxL, token_mask_BxL)
    lay, hidden = self.expanded_hidden(tokens_BxL, scored, cap, noise_level_B,
                                       token_mask_BxL=token_mask_BxL, dropout_key=dropout_key)
    out = self.dag_outputs(lay, hidden, cap)
    log_q = dag_state_marginals(out.log_links_BxNxN, out.log_start_BxN, out.end_BxN,
                                lay.count_B, cap)
    mix_BxMxV = mixture_log_probs(log_q, out.state_logits_BxNxV)
    rank_BxL = jnp.clip(jnp.cumsum(scored, axis=1) - 1, 0, cap - 1)
    mixed_BxLxV = jnp.take_along_axis(mix_BxMxV, rank_BxL[..., None], axis=1)
    plain = self.backbone.logits(jnp.take_along_axis(hidden, lay.first_slot_BxL[..., None], 1))
    return jnp.where(scored[..., None], mixed_BxLxV, plain)

  def scored(self, tokens_BxL, token_mask_BxL=None):
    scored = jnp.asarray(tokens_BxL) == self.mask_id
    return scored if token_mask_BxL is None else scored & jnp.asarray(token_mask_BxL, bool)

  def __call__(self, tokens_BxL, noise_level_B=None, *, token_mask_BxL=None, dropout_key=None,
               causal=None):
    if causal:
      raise ValueError("ExLM is a bidirectional denoiser: it has no causal mode (causal=True); "
                       "score it with the masked measures, not the next-token NLL.")
    tokens_BxL = jnp.asarray(tokens_BxL)
    caps = expansion_caps(tokens_BxL.shape[1])
    count = jnp.max(jnp.sum(self.scored(tokens_BxL, token_mask_BxL), axis=1))
    run = [lambda ops, c=c: self.readout(*ops, cap=c, token_mask_BxL=token_mask_BxL,
                                         dropout_key=dropout_key) for c in caps]
    if not isinstance(count, jax.core.Tracer):  # eager: run the one branch that fits
      return run[int(np.searchsorted(caps, int(count)))]((tokens_BxL, noise_level_B))
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(caps), count), run,
                          (tokens_BxL, noise_level_B))

  def hidden_states(self, tokens_BxL, noise_level_B=None, *, token_mask_BxL=None,
                    dropout_key=None, causal=None):
    """The features the samplers and the PLL read: for ExLM the per-position output [B, L, V]
    itself (a mixture over states is not a head over one hidden vector); `logits` is then the
    identity."""
    return self(tokens_BxL, noise_level_B, token_mask_BxL=token_mask_BxL,
                dropout_key=dropout_key, causal=causal)

  def logits(self, features):
    return features
