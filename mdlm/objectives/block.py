"""objective=bd3lm: block diffusion (Arriola, Gokaslan, Chiu, Yang, Qi, Han, Sahoo and Kuleshov
2025, "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models",
BD3-LM).

The sequence of L tokens is cut into K = L / b blocks of b tokens; the model is autoregressive over
blocks and a masked diffusion inside each one:

  -log p(x) = -sum_k log p(x^k | x^<k)  <=  sum_k NELBO_k,
  NELBO_k   = int w(t) E_{x_t^k}[ sum_{i in block k, masked} -log p_theta(x_i | x_t^k, x^<k) ] dt
              (+ the reconstruction and prior terms of the full bound, as mdlm.measures.nelbo).

Every block has its own noise level t_k (drawn independently per block and row, stratified over
all B x K of them), so one draw estimates every block's term. Reported per real token like MDLM's
NELBO, so block sizes compare on one scale: b = L is MDLM, and b = 1 is exactly autoregressive
(-log p(x_i | x_<i) from a masked position i that sees the clean prefix; its expectation over t
is a closed form, used directly, see `single_token_weight`).

Vectorized training (the paper's section 3.2): one forward pass over the 2L tokens [x_t, x_0]
with rotary positions 0..L-1 for both halves and the block-diffusion attention mask
(`block_diffusion_mask`): a noisy query of block k sees its own noisy block and the clean blocks
< k; a clean query of block k sees the clean blocks <= k (block-causal). The logits of the noisy
half are the per-block conditionals of a loop over blocks, in one pass (a test checks that).

Clipped schedules (section 4): a block's mask rate drawn from U[beta, omega] (objective.clip_min,
clip_max) instead of U[0, 1], weight 1 / rate. Without time conditioning the continuous NELBO
depends on the schedule only through the mask rate (Shi et al. 2024, "Simplified and Generalized
Masked Diffusion for Discrete Data", section 3: int w(t) E_{Bern(1 - alpha(t))}[.] dt =
int_0^1 (1/m) E_{Bern(m)}[.] dm), so the clipped loss is that integrand averaged over
[beta, omega]: a training objective of lower variance, not a bound (evaluation always uses the
full range). objective.resample redraws a block whose masked fraction falls outside
[beta, omega]. The data-driven choice (objective.clip_search): every clip_search_every steps the
last clip_search_batches batches score each candidate range (widths clip_search_widths, offsets
on a grid of clip_search_delta) by the variance of its per-block loss estimates, with the model
of that step and no gradient, and training continues with the range of least variance (it is
kept in the train state, objective/bd3lm/clip, and checkpointed). Its cost: one forward pass of
the batch per candidate on each search batch (36 candidates with the paper's widths and
delta 0.05). Measured at the default size (experiments/bench_objectives.py, CPU), a step that
searches takes 13.3-13.6x a plain step, so the overhead is about 12.5 x clip_search_batches /
clip_search_every (10% with the defaults); steps that do not search cost nothing extra.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from mdlm import config as config_lib
from mdlm import diffusion
from mdlm.diffusion import LossTerms
from mdlm.objectives.base import (Objective, Setup, real_token_count, refuse_labelled_data,
                                  register)

# Redraws of a block's mask under objective.resample before its draw is kept as it is.
RESAMPLE_TRIES = 32


@dataclasses.dataclass
class BlockConfig(config_lib.ObjectiveConfig):
  """block_size: tokens per block b (1: autoregressive, data.seq_len: MDLM); it must divide
  data.seq_len. clip_min / clip_max: the clipped mask-rate range [beta, omega] (0, 1: none).
  resample: redraw blocks whose masked fraction falls outside it. clip_search: choose the range
  from the data (module docstring) among clip_search_widths x offsets on a clip_search_delta grid
  (and the full range), every clip_search_every steps over the last clip_search_batches."""

  name: str = "bd3lm"
  in_phases = False
  block_size: int = 16
  clip_min: float = 0.0
  clip_max: float = 1.0
  resample: bool = False
  clip_search: bool = False
  clip_search_widths: List[float] = dataclasses.field(
      default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
  clip_search_delta: float = 0.05
  # A search step costs about 13 plain steps (36 no-gradient passes; module docstring), so the
  # defaults search 2 batches of every 250 steps: about 10% on top of training.
  clip_search_every: int = 250
  clip_search_batches: int = 2

  @property
  def clipped(self) -> bool:
    return self.clip_search or (self.clip_min, self.clip_max) != (0.0, 1.0)

  def check(self, cfg: config_lib.Config) -> None:
    check = config_lib._check
    check(cfg.model.kind == "denoiser",
          "objective=bd3lm trains a bidirectional denoiser under the block-diffusion attention "
          "mask: set model.kind=denoiser (an AR model is objective=ar)")
    check(not cfg.model.time_conditioning,
          "objective=bd3lm draws one noise level per block, which a per-sequence time "
          "conditioning cannot express (BD3-LM trains without it): set "
          "model.time_conditioning=false")
    check_block_size(self.block_size, cfg.data.seq_len)
    check(0.0 <= self.clip_min < self.clip_max <= 1.0,
          f"objective.clip_min={self.clip_min} and objective.clip_max={self.clip_max} must "
          "satisfy 0 <= clip_min < clip_max <= 1 (the mask-rate range [beta, omega])")
    check(not (self.clipped and cfg.noise.num_steps is not None),
          "the clipped schedule (objective.clip_min / clip_max / clip_search) draws continuous "
          "mask rates; drop noise.num_steps or the clipping")
    check(not self.resample or self.clipped,
          "objective.resample redraws blocks outside the clipped range: set objective.clip_min / "
          "clip_max (or clip_search=true), or drop resample")
    if self.clip_search:
      check(self.block_size > 1,
            "objective.clip_search with block_size=1: a one-token block's loss is already exact "
            "(no Monte Carlo variance to reduce); drop clip_search")
      check(bool(self.clip_search_widths) and all(0 < w <= 1 for w in self.clip_search_widths),
            f"objective.clip_search_widths={list(self.clip_search_widths)} must be a non-empty "
            "list of widths in (0, 1] (the paper: [0.5, 0.6, 0.7, 0.8, 0.9])")
      check(0 < self.clip_search_delta < 1,
            f"objective.clip_search_delta={self.clip_search_delta} must lie in (0, 1)")
      check(1 <= self.clip_search_batches <= self.clip_search_every,
            f"objective.clip_search_batches={self.clip_search_batches} must lie in [1, "
            f"clip_search_every={self.clip_search_every}]")
    refuse_labelled_data(cfg, self.name)

  def candidates(self) -> np.ndarray:
    """[C, 2] candidate (beta, omega) ranges of the clipping search; row 0 is the full range."""
    out = [(1e-3, 1.0)]
    for width in self.clip_search_widths:
      for lo in np.arange(0.0, 1.0 - width + 1e-9, self.clip_search_delta):
        out.append((max(float(lo), 1e-3), min(float(lo) + float(width), 1.0)))
    return np.asarray(sorted(set(out), key=out.index), np.float32)


def check_block_size(block_size, length: int) -> int:
  """Refuses a block size that is not an integer in [1, L] dividing L."""
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise ValueError(f"Invalid config: objective.block_size={block_size!r} must be an integer")
  divisors = [d for d in (1, 2, 4, 8, 16, 32, 64) if length % d == 0 and d <= length]
  if not (1 <= block_size <= length and length % block_size == 0):
    raise ValueError(
        f"Invalid config: objective.block_size={block_size} must divide the sequence length "
        f"{length} (data.seq_len) and lie in [1, {length}]; choose a divisor such as "
        f"{', '.join(map(str, divisors + [length]))} (1 is autoregressive, {length} is MDLM), or "
        "change data.seq_len")
  return int(block_size)


# ----------------------------------------------------------------------------- attention


def block_causal_mask(length: int, block_size: int) -> np.ndarray:
  """[L, L] boolean: query i sees key j iff block(j) <= block(i)."""
  block_L = np.arange(length) // block_size
  return block_L[None, :] <= block_L[:, None]


def block_diffusion_mask(length: int, block_size: int) -> np.ndarray:
  """[2L, 2L] boolean mask over [x_t, x_0]: noisy block k sees noisy block k (block diagonal)
  and clean blocks < k (offset block-causal); clean block k sees clean blocks <= k
  (block-causal); clean queries never see noisy keys."""
  block_L = np.arange(length) // block_size
  same = block_L[:, None] == block_L[None, :]
  earlier = block_L[None, :] < block_L[:, None]
  causal = block_L[None, :] <= block_L[:, None]
  top = np.concatenate([same, earlier], axis=1)
  bottom = np.concatenate([np.zeros_like(same), causal], axis=1)
  return np.concatenate([top, bottom], axis=0)


def block_hidden(model, xt_BxL, x0_BxL, block_size: int, *, token_mask_BxL=None,
                 dropout_key=None):
  """Final-norm states [B, L, D] of the noisy half of one pass over [x_t, x_0] (module
  docstring); token_mask (padding) masks keys of both halves."""
  length = x0_BxL.shape[1]
  check_block_size(block_size, length)
  tokens = jnp.concatenate([jnp.asarray(xt_BxL), jnp.asarray(x0_BxL)], axis=1)
  keys = None
  if token_mask_BxL is not None:
    keys = jnp.concatenate([token_mask_BxL, token_mask_BxL], axis=1)
  positions = jnp.concatenate([jnp.arange(length), jnp.arange(length)])
  mask = jnp.asarray(block_diffusion_mask(length, block_size))[None]
  hidden = model.hidden_states(tokens, None, token_mask_BxL=keys, dropout_key=dropout_key,
                               causal=False, positions=positions, attention_mask=mask)
  return hidden[:, :length]


def block_logits(model, xt_BxL, x0_BxL, block_size: int, **kw):
  """Logits [B, L, V] of x_0 at every position of x_t given the clean earlier blocks."""
  return model.logits(block_hidden(model, xt_BxL, x0_BxL, block_size, **kw))


# ----------------------------------------------------------------------------- the noise


def draw_rates(key, batch_size: int, num_blocks: int, setup: Setup, clip=None):
  """(mask rate [B, K], NELBO weight [B, K]) of every block, stratified over all B x K.

  clip=None: t ~ U[t_min, 1) (or the discrete grid) through the run's schedule, weight
  (1 - t_min) w(t) as MDLM (`diffusion.time_weight`); with K = 1 exactly MDLM's draw.
  clip=(beta, omega): the rate itself ~ U[beta, omega], weight 1 / rate."""
  if clip is None:
    t = diffusion.sample_times(key, batch_size * num_blocks, t_min=setup.t_min,
                               antithetic=setup.antithetic, num_steps=setup.num_steps)
    weight = diffusion.time_weight(t, setup.schedule, num_steps=setup.num_steps, t_min=setup.t_min)
    return (setup.schedule.mask_prob(t).reshape(batch_size, num_blocks),
            weight.reshape(batch_size, num_blocks))
  u = diffusion.stratified_uniform(key, batch_size * num_blocks, antithetic=setup.antithetic)
  rate = clip[0] + (clip[1] - clip[0]) * u.reshape(batch_size, num_blocks)
  return rate, 1.0 / rate


def per_token(x_BxK, block_size: int):
  """A per-block array repeated over each block's tokens: [B, K] -> [B, K b]."""
  return jnp.repeat(x_BxK, block_size, axis=1)


def draw_masks(key, rate_BxK, token_mask_BxL, block_size: int, clip=None, resample=False):
  """Each real token masked with its block's rate. resample (with clip = (beta, omega)): a block
  whose masked fraction lies outside [beta, omega] is redrawn, up to RESAMPLE_TRIES times."""
  token_mask_BxL = jnp.asarray(token_mask_BxL, bool)
  rate_BxL = per_token(rate_BxK, block_size)

  def draw(i):
    k = key if i is None else jax.random.fold_in(key, i)
    return (jax.random.uniform(k, token_mask_BxL.shape, jnp.float32) < rate_BxL) & token_mask_BxL

  masked = draw(None)
  if not resample:
    return masked
  b, length = token_mask_BxL.shape
  real_BxK = jnp.sum(token_mask_BxL.reshape(b, -1, block_size), axis=-1)

  def outside(m):
    frac = jnp.sum(m.reshape(b, -1, block_size), axis=-1) / jnp.maximum(real_BxK, 1)
    return ((frac < clip[0]) | (frac > clip[1])) & (real_BxK > 0)

  def body(carry):
    i, m = carry
    return i + 1, jnp.where(per_token(outside(m), block_size), draw(i), m)

  _, masked = jax.lax.while_loop(lambda c: (c[0] <= RESAMPLE_TRIES) & jnp.any(outside(c[1])),
                                 body, (jnp.int32(1), masked))
  return masked


def single_token_weight(setup: Setup, clipped: bool) -> float:
  """E_t[weight x P(masked)] of a one-token block, the b = 1 loss in closed form: (1/m) m = 1 per
  rate under clipping; int_{t_min}^1 -alpha'(t) dt = alpha(t_min) - alpha(1) otherwise (the
  discrete grid sums to alpha(0) - alpha(1))."""
  if clipped:
    return 1.0
  with jax.ensure_compile_time_eval():
    t0 = 0.0 if setup.num_steps is not None else setup.t_min
    return float(setup.schedule.alpha(t0)) - float(setup.schedule.alpha(1.0))


# ----------------------------------------------------------------------------- the objective


@register
class BD3LM(Objective):
  """See the module docstring."""

  name = "bd3lm"
  settings_class = BlockConfig
  causal = False
  measures = ("bd3lm", "nelbo")

  def __init__(self, settings: BlockConfig, setup: Setup):
    super().__init__(settings, setup)
    self.block_size = int(settings.block_size)
    if settings.clip_search:
      self.candidates = settings.candidates()

  def init_state(self):
    s = self.settings
    if not s.clip_search:
      return None
    c = len(self.candidates)
    zeros = jnp.zeros((c,), jnp.float32)
    return {"clip": jnp.asarray([s.clip_min, s.clip_max], jnp.float32), "sum": zeros,
            "sumsq": zeros, "count": zeros}

  def _clip(self, state):
    s = self.settings
    if s.clip_search:
      return (state["clip"][0], state["clip"][1])
    return (s.clip_min, s.clip_max) if s.clipped else None

  def draw(self, batch, key, step, state):
    key = jax.random.fold_in(key, 0)
    x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
    b, length = x0.shape
    out = {}
    if self.block_size == 1:  # closed form: every token masked, exact expected weight
      out["xt"] = jnp.where(token_mask, jnp.asarray(self.setup.mask_id, x0.dtype), x0)
      out["weight"] = jnp.full((b, length), single_token_weight(self.setup, self.settings.clipped))
    else:
      clip = self._clip(state)
      rate, weight = draw_rates(jax.random.fold_in(key, 0), b, length // self.block_size,
                                self.setup, clip)
      masked = draw_masks(jax.random.fold_in(key, 1), rate, token_mask, self.block_size, clip,
                          self.settings.resample)
      out["xt"] = jnp.where(masked, jnp.asarray(self.setup.mask_id, x0.dtype), x0)
      out["weight"] = weight
    if self.settings.clip_search:
      s = self.settings
      phase = jnp.mod(step, s.clip_search_every)
      out["search"] = jnp.full((b,), phase >= s.clip_search_every - s.clip_search_batches)
      out["pick"] = jnp.full((b,), phase == s.clip_search_every - 1)
    return out

  def loss(self, model, batch, key, *, dropout_key=None):
    x0, token_mask, xt = batch["tokens"], batch["token_mask"], batch["xt"]
    logits = block_logits(model, xt, x0, self.block_size,
                          token_mask_BxL=self.setup.attention_mask(batch), dropout_key=dropout_key)
    ce_BxL = diffusion.masked_cross_entropy(logits, x0, self.setup.mask_id)
    scored = (xt == self.setup.mask_id) & jnp.asarray(token_mask, bool)
    weight_BxL = batch["weight"]
    if weight_BxL.shape != x0.shape:
      weight_BxL = per_token(weight_BxL, self.block_size)
    terms = diffusion.loss_terms(jnp.where(scored, weight_BxL * ce_BxL, 0.0), token_mask, scored)
    aux = {}
    if self.settings.clip_search:
      aux = jax.lax.cond(jnp.any(batch["search"]),
                         lambda: clip_search_stats(model, batch, key, self.setup, self.block_size,
                                                   self.candidates),
                         lambda: _no_stats(x0.shape[0], len(self.candidates)))
    return terms, aux

  def denominator(self, batch):
    return real_token_count(batch)

  def update_state(self, state, batch, terms, aux):
    del terms
    if not self.settings.clip_search:
      return state
    state = {k: state[k] + jnp.sum(aux[k], axis=0) for k in ("sum", "sumsq", "count")} | {
        "clip": state["clip"]}
    count = jnp.maximum(state["count"], 1.0)
    variance = state["sumsq"] / count - jnp.square(state["sum"] / count)
    best = jnp.asarray(self.candidates)[jnp.argmin(variance)]
    pick = jnp.any(batch["pick"])
    zeros = jnp.zeros_like(state["sum"])
    return {"clip": jnp.where(pick, best, state["clip"]),
            "sum": jnp.where(pick, zeros, state["sum"]),
            "sumsq": jnp.where(pick, zeros, state["sumsq"]),
            "count": jnp.where(pick, zeros, state["count"])}


def _no_stats(batch_size: int, num_candidates: int) -> dict:
  zeros = jnp.zeros((batch_size, num_candidates), jnp.float32)
  return {"sum": zeros, "sumsq": zeros, "count": zeros}


def clip_search_stats(model, batch, key, setup: Setup, block_size: int, candidates) -> dict:
  """Per row and candidate range: the sum, sum of squares and count of the per-block loss
  estimates (the mean per-token clipped loss of each block with real tokens), from one draw per
  candidate under the current model, without gradient. The variance across blocks and rows is
  what the search minimises (the paper's criterion)."""
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  b, length = x0.shape
  num_blocks = length // block_size
  real_BxK = jnp.sum(token_mask.reshape(b, num_blocks, block_size), axis=-1)

  def one(c):
    clip = (jnp.asarray(candidates)[c, 0], jnp.asarray(candidates)[c, 1])
    k = jax.random.fold_in(jax.random.fold_in(key, 7), c)
    rate, weight = draw_rates(jax.random.fold_in(k, 0), b, num_blocks, setup, clip)
    masked = draw_masks(jax.random.fold_in(k, 1), rate, token_mask, block_size)
    xt = jnp.where(masked, jnp.asarray(setup.mask_id, x0.dtype), x0)
    logits = block_logits(model, xt, x0, block_size, token_mask_BxL=setup.attention_mask(batch))
    ce = diffusion.masked_cross_entropy(jax.lax.stop_gradient(logits), x0, setup.mask_id)
    loss_BxL = jnp.where(masked, per_token(weight, block_size) * ce, 0.0)
    value_BxK = jnp.sum(loss_BxL.reshape(b, num_blocks, block_size), -1) / jnp.maximum(real_BxK, 1)
    has = real_BxK > 0
    return (jnp.sum(jnp.where(has, value_BxK, 0.0), -1),
            jnp.sum(jnp.where(has, jnp.square(value_BxK), 0.0), -1),
            jnp.sum(has, -1).astype(jnp.float32))

  sums, sumsqs, counts = jax.lax.map(one, jnp.arange(len(candidates)))  # each [C, B]
  return {"sum": sums.T, "sumsq": sumsqs.T, "count": counts.T}


# ----------------------------------------------------------------------------- evaluation


def settings_of(setup: Setup) -> BlockConfig:
  settings = getattr(setup, "objective", None)
  if not isinstance(settings, BlockConfig):
    raise ValueError("the bd3lm measure scores a model trained with objective=bd3lm (it needs "
                     "the run's objective.block_size); this run was trained with "
                     f"objective={getattr(settings, 'name', None)}.")
  return settings


def nelbo_terms(model, batch, key, setup: Setup, block_size=None) -> LossTerms:
  """One draw of the full block NELBO per real token, an upper bound on -log p(x): per block
  the NELBO integral over [t_min, 1] (unclipped, whatever the training clipping), the
  reconstruction term at t_min and the prior term alpha(1) log V (mdlm.measures.nelbo_terms;
  with b = L it is that measure, draw for draw). With b = 1 the expectation over t is exact:
  (1 - alpha(1)) (-log p(x_i | x_<i)) + alpha(1) log V per token, no Monte Carlo."""
  b = settings_of(setup).block_size if block_size is None else block_size
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  rows, length = x0.shape
  check_block_size(b, length)
  real_B = jnp.sum(token_mask, axis=-1).astype(jnp.float32)
  with jax.ensure_compile_time_eval():
    alpha_1 = float(setup.schedule.alpha(1.0))
  prior_B = real_B * alpha_1 * math.log(setup.vocab_size)
  if b == 1:
    xt = jnp.where(token_mask, jnp.asarray(setup.mask_id, x0.dtype), x0)
    ce = diffusion.masked_cross_entropy(block_logits(model, xt, x0, 1, token_mask_BxL=token_mask),
                                        x0, setup.mask_id)
    total_B = (1.0 - alpha_1) * jnp.sum(jnp.where(token_mask, ce, 0.0), -1) + prior_B
    return LossTerms(total_B, real_B, real_B)
  time_key, mask_key = jax.random.split(jax.random.fold_in(key, 0))
  rate, weight = draw_rates(time_key, rows, length // b, setup)
  masked = (jax.random.uniform(mask_key, x0.shape, jnp.float32) < per_token(rate, b)) & token_mask
  xt = jnp.where(masked, jnp.asarray(setup.mask_id, x0.dtype), x0)
  ce = diffusion.masked_cross_entropy(block_logits(model, xt, x0, b, token_mask_BxL=token_mask),
                                      x0, setup.mask_id)
  integral_B = jnp.sum(jnp.where(masked, per_token(weight, b) * ce, 0.0), -1)
  total_B = integral_B + reconstruction(model, batch, jax.random.fold_in(key, 1), setup, b) + prior_B
  return LossTerms(total_B, real_B, jnp.sum(masked, -1).astype(jnp.float32))


def reconstruction(model, batch, key, setup: Setup, block_size: int):
  """Per row: sum over blocks of E_{x_t0}[sum over the masked i of the block of
  -log p(x_i | x_t0 block, clean earlier blocks)], t0 = t_min (0 in discrete time), estimated as
  mdlm.measures.reconstruction_terms within each block: one real position j of the block chosen
  uniformly and masked, every other one with probability p0, estimate n_k p0 CE_j."""
  t0 = 0.0 if setup.num_steps is not None else setup.t_min
  with jax.ensure_compile_time_eval():
    p0 = float(setup.schedule.mask_prob(t0))
  x0, token_mask = batch["tokens"], jnp.asarray(batch["token_mask"], bool)
  rows, length = x0.shape
  if p0 <= 0.0:
    return jnp.zeros((rows,), jnp.float32)
  k = length // block_size
  pick_key, mask_key = jax.random.split(key)
  score = jnp.where(token_mask, jax.random.uniform(pick_key, x0.shape), -1.0)
  j_BxK = jnp.argmax(score.reshape(rows, k, block_size), axis=-1)
  picked = (jnp.arange(block_size)[None, None, :] == j_BxK[..., None]).reshape(rows, length)
  masked = token_mask & (picked | (jax.random.uniform(mask_key, x0.shape) < p0))
  xt = jnp.where(masked, jnp.asarray(setup.mask_id, x0.dtype), x0)
  logits = block_logits(model, xt, x0, block_size, token_mask_BxL=token_mask)
  ce = diffusion.masked_cross_entropy(logits, x0, setup.mask_id)
  real_BxK = jnp.sum(token_mask.reshape(rows, k, block_size), axis=-1).astype(jnp.float32)
  ce_BxK = jnp.sum(jnp.where(picked, ce, 0.0).reshape(rows, k, block_size), axis=-1)
  return jnp.sum(jnp.where(real_BxK > 0, real_BxK * p0 * ce_BxK, 0.0), axis=-1)
