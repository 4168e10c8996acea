"""Masking as a research variable: how many tokens a masked objective corrupts, which, and into what.

The pieces the masked-LM family is built from (mdlm.objectives.diffusion composes them; MEAP uses
the exact-count draw). Every function works on the whole global batch at once with static shapes,
so it runs inside the jitted train step.

How many (per sequence b with n_b eligible tokens):
  `mask_count(n, p)`          exactly round(p n) (BERT; Wettig et al. 2023)
  `uniform_counts`            k ~ U{1, ..., round(max_ratio n)} (u-PMLM; Liao et al. 2020)
  `decay_ratio`               masking-ratio decay over training (Yang et al. 2023)
  `beta_times` / `histogram_times`   importance-sampled diffusion times t ~ q(t) with their
                              densities, for the 1/q(t)-weighted NELBO
Which:
  `choose_bernoulli`          each token independently (MDLM's forward process)
  `choose_uniform`            exactly k, uniformly (rank of uniform scores)
  `choose_weighted`           exactly k, without replacement, with probability proportional to a
                              per-token weight (Gumbel top-k)
  `choose_spans`              exactly k in round(k / mean) contiguous spans
Into what:
  `corrupt`                   the mask, or BERT's 80% mask / 10% random token / 10% unchanged
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from mdlm.diffusion import stratified_uniform

# ----------------------------------------------------------------------------- how many


def mask_count(eligible, ratio):
  """round(ratio * eligible), halves rounded up, in exact integer arithmetic (ratio taken to four
  decimals): a float32 product would round 0.15 * 10 = 1.5000001 differently from 1.4999999.
  A Python int gives a Python int (no JAX op: the data pipeline calls this once per row); a traced
  ratio (a decaying one) is rounded to four decimals on the device."""
  if isinstance(ratio, (int, float, np.floating)):
    ratio_e4 = int(round(float(ratio) * 10_000))
  else:
    ratio_e4 = jnp.round(jnp.asarray(ratio, jnp.float32) * 10_000).astype(jnp.int32)
  if isinstance(eligible, (int, np.integer)) and isinstance(ratio_e4, int):
    return (int(eligible) * ratio_e4 + 5_000) // 10_000
  return (jnp.asarray(eligible, jnp.int32) * ratio_e4 + 5_000) // 10_000


def uniform_counts(key, num_eligible_B, *, max_ratio: float = 1.0, antithetic: bool = True):
  """u-PMLM's count: k_b uniform on {1, ..., K_b}, K_b = max(1, round(max_ratio n_b)), drawn as
  ceil(u K_b) with u stratified over the batch (0 where n_b = 0)."""
  n_B = jnp.asarray(num_eligible_B, jnp.int32)
  top_B = jnp.maximum(mask_count(n_B, max_ratio), 1)
  u_B = stratified_uniform(key, n_B.shape[0], antithetic=antithetic)
  k_B = jnp.clip(jnp.floor(u_B * top_B).astype(jnp.int32) + 1, 1, top_B)
  return jnp.where(n_B > 0, k_B, 0)


def decay_ratio(step, total_steps: int, p0: float, form: str):
  """The masking ratio at 0-based training step s of S (Yang et al. 2023, "Learning Better
  Masking for Better Language Model Pre-training", and their code): cosine
  p0 (1 + cos(pi s / S)) + 0.02 (from 2 p0 + 0.02 down to 0.02), linear 2 p0 (1 - s / S)."""
  frac = jnp.asarray(step, jnp.float32) / float(max(total_steps, 1))
  if form == "cosine":
    return p0 * (1.0 + jnp.cos(jnp.pi * frac)) + 0.02
  if form == "linear":
    return 2.0 * p0 * (1.0 - frac)
  raise ValueError(f"decay form {form!r}; choose cosine or linear.")


# ----------------------------------------------------------------------------- importance times


def beta_times(key, batch_size: int, a: float, b: float, *, t_min: float, antithetic: bool = True,
               iterations: int = 30):
  """t ~ Beta(a, b) mapped onto [t_min, 1), by inverting the CDF of stratified uniforms (so the
  draws stay stratified). Returns (t_B, q_B) with q the density of t."""
  u_B = stratified_uniform(key, batch_size, antithetic=antithetic)
  lo, hi = jnp.zeros_like(u_B), jnp.ones_like(u_B)

  def bisect(_, bounds):  # the regularized incomplete beta function is increasing in x
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = special.betainc(a, b, mid) < u_B
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
  x_B = jnp.clip(0.5 * (lo + hi), 1e-7, 1.0 - 1e-7)
  log_pdf = ((a - 1.0) * jnp.log(x_B) + (b - 1.0) * jnp.log1p(-x_B)
             - special.betaln(jnp.float32(a), jnp.float32(b)))
  return t_min + (1.0 - t_min) * x_B, jnp.exp(log_pdf) / (1.0 - t_min)


def histogram_init(bins: int, history: int) -> dict:
  """State of the adaptive proposal: the last `history` loss values seen in each of `bins`
  equal-width bins of [t_min, 1), and how many were ever recorded there."""
  return {"values": jnp.zeros((bins, history), jnp.float32),
          "count": jnp.zeros((bins,), jnp.int32)}


def histogram_probs(state: dict, uniform_mix: float):
  """Bin probabilities q_k proportional to the root mean square of the bin's recorded losses,
  the variance-minimising proposal (Nichol and Dhariwal 2021, "Improved Denoising Diffusion
  Probabilistic Models": sqrt E[L_t^2]), mixed with `uniform_mix` of the uniform; uniform until
  every bin holds its full history."""
  values, count = state["values"], state["count"]
  bins, history = values.shape
  rms = jnp.sqrt(jnp.mean(jnp.square(values), axis=1))
  warm = jnp.all(count >= history) & (jnp.sum(rms) > 0)
  q = jnp.where(warm, rms / jnp.maximum(jnp.sum(rms), 1e-30), 1.0 / bins)
  return (1.0 - uniform_mix) * q + uniform_mix / bins


def histogram_times(key, batch_size: int, probs_K, *, t_min: float, antithetic: bool = True):
  """t from the piecewise-constant density with bin masses probs_K over [t_min, 1), by inverting
  its CDF at stratified uniforms. Returns (t_B, q_B, bin_B) with q the density of t."""
  bins = probs_K.shape[0]
  u_B = stratified_uniform(key, batch_size, antithetic=antithetic)
  cdf_K = jnp.cumsum(probs_K)
  bin_B = jnp.minimum(jnp.searchsorted(cdf_K, u_B, side="right"), bins - 1)
  start_B = cdf_K[bin_B] - probs_K[bin_B]
  within_B = jnp.clip((u_B - start_B) / probs_K[bin_B], 0.0, 1.0 - 1e-6)
  x_B = (bin_B + within_B) / bins
  q_B = probs_K[bin_B] * bins / (1.0 - t_min)
  return t_min + (1.0 - t_min) * x_B, q_B, bin_B


def histogram_record(state: dict, bin_B, value_B) -> dict:
  """Pushes each value into its bin's ring buffer (rows in order, so two rows of one bin both
  land)."""
  history = state["values"].shape[1]

  def push(i, st):
    k = bin_B[i]
    slot = st["count"][k] % history
    return {"values": st["values"].at[k, slot].set(value_B[i]),
            "count": st["count"].at[k].add(1)}

  return jax.lax.fori_loop(0, bin_B.shape[0], push, state)


# ----------------------------------------------------------------------------- which


def choose_bernoulli(key, eligible_BxL, prob_B):
  """Each eligible position independently with probability prob_B[b] (MDLM's q(xt | x0))."""
  move_BxL = jax.random.uniform(key, eligible_BxL.shape, jnp.float32) < prob_B[:, None]
  return move_BxL & eligible_BxL


def _lowest(score_BxL, count_B):
  """The count_B[b] positions of row b with the lowest scores (ties impossible for draws)."""
  rank_BxL = jnp.argsort(jnp.argsort(score_BxL, axis=1), axis=1)
  return rank_BxL < jnp.reshape(count_B, (-1, 1))


def choose_uniform(key, eligible_BxL, count_B):
  """Exactly count_B[b] eligible positions of row b, a uniformly random subset."""
  # Ineligible positions get score 2 > any uniform draw, so they rank after every eligible one.
  score_BxL = jnp.where(eligible_BxL, jax.random.uniform(key, eligible_BxL.shape), 2.0)
  return eligible_BxL & _lowest(score_BxL, count_B)


def choose_weighted(key, eligible_BxL, count_B, log_weight_BxL):
  """Exactly count_B[b] eligible positions, drawn one after another without replacement with
  probability proportional to exp(log_weight) (the Gumbel top-k trick)."""
  gumbel_BxL = jax.random.gumbel(key, eligible_BxL.shape, jnp.float32)
  score_BxL = jnp.where(eligible_BxL, -(log_weight_BxL + gumbel_BxL), jnp.inf)
  return eligible_BxL & _lowest(score_BxL, count_B)


def _composition(key, total, parts, length: int):
  """A uniformly random composition of `total` items into `parts` non-empty parts: the part index
  of each item 0..length-1 (items >= total get index >= parts). Cuts are `parts - 1` of the
  `total - 1` gaps, chosen uniformly."""
  slot_L = jnp.arange(length)
  gap_ok = (slot_L >= 1) & (slot_L < total)
  score_L = jnp.where(gap_ok, jax.random.uniform(key, (length,)), 2.0)
  rank_L = jnp.argsort(jnp.argsort(score_L))
  cut_L = gap_ok & (rank_L < parts - 1)
  return jnp.cumsum(cut_L) + jnp.where(slot_L < total, 0, length)


def _span_row(key, eligible_L, count, mean_span: float):
  length = eligible_L.shape[0]
  n = jnp.sum(eligible_L)
  spans = jnp.clip(jnp.round(count / mean_span).astype(jnp.int32), 1, jnp.maximum(n - count + 1, 1))
  span_key, gap_key = jax.random.split(key)
  # Span lengths: `count` masked items split into `spans` parts. Gaps: the n - count others split
  # into spans + 1 parts of which the first and last may be empty (a composition of
  # n - count + 2 into spans + 1 parts, less one item at each end).
  span_id = _composition(span_key, count, spans, length)
  span_len = jax.ops.segment_sum(jnp.ones(length, jnp.int32), span_id, num_segments=length + 1)
  gap_id = _composition(gap_key, n - count + 2, spans + 1, length + 2)
  gap_len = jax.ops.segment_sum(jnp.ones(length + 2, jnp.int32), gap_id, num_segments=length + 2)
  gap_len = gap_len.at[0].add(-1).at[spans].add(-1)
  # Span i starts after gaps 0..i and spans 0..i-1.
  start = jnp.cumsum(gap_len[:length]) + jnp.cumsum(span_len[:length]) - span_len[:length]
  live = jnp.arange(length) < spans
  edges = jnp.zeros(length + 1, jnp.int32)
  edges = edges.at[jnp.where(live, start, length)].add(1)
  edges = edges.at[jnp.where(live, start + span_len[:length], length)].add(-1)
  in_span = jnp.cumsum(edges)[:length] > 0  # over the compressed (eligible-only) index
  index_L = jnp.cumsum(eligible_L) - 1
  return eligible_L & in_span[jnp.clip(index_L, 0, length - 1)] & (count > 0)


def choose_spans(key, eligible_BxL, count_B, mean_span: float):
  """Exactly count_B[b] eligible positions of row b, in m = round(count / mean_span) contiguous
  spans (at least 1; fewer if the row has too few other tokens to separate them), span lengths
  and gaps uniformly random compositions (so span lengths are close to geometric with mean
  count / m). Spans are contiguous in the eligible positions: with a padding mask, they end
  before the padding."""
  keys = jax.random.split(key, eligible_BxL.shape[0])
  count_B = jnp.reshape(jnp.asarray(count_B, jnp.int32), (-1,))
  return jax.vmap(_span_row, in_axes=(0, 0, 0, None))(keys, eligible_BxL, count_B, mean_span)


# ----------------------------------------------------------------------------- into what


def corrupt(key, x0_BxL, chosen_BxL, mask_id: int, kind: str = "mask", replacement_ids=None):
  """The corrupted input: chosen positions become the mask ("mask"), or (BERT's "bert")
  80% the mask, 10% a token drawn uniformly from `replacement_ids`, 10% unchanged."""
  mask = jnp.asarray(mask_id, x0_BxL.dtype)
  if kind == "mask":
    return jnp.where(chosen_BxL, mask, x0_BxL)
  if kind != "bert":
    raise ValueError(f"corruption {kind!r}; choose mask or bert.")
  split_key, token_key = jax.random.split(key)
  u_BxL = jax.random.uniform(split_key, x0_BxL.shape)
  ids = jnp.asarray(replacement_ids, x0_BxL.dtype)
  random_BxL = ids[jax.random.randint(token_key, x0_BxL.shape, 0, ids.shape[0])]
  out = jnp.where(u_BxL < 0.8, mask, jnp.where(u_BxL < 0.9, random_BxL, x0_BxL))
  return jnp.where(chosen_BxL, out, x0_BxL)


# ----------------------------------------------------------------------------- content classes


def class_weights(class_loss_C):
  """Yang et al.'s weight of each class: sigmoid(2 z), z the class's running loss z-scored across
  classes (unbiased std; a zero std counts as 1e-4, so equal losses give equal weights 0.5)."""
  loss = jnp.asarray(class_loss_C, jnp.float32)
  std = jnp.std(loss, ddof=1)
  std = jnp.where(std > 0, std, 1e-4)
  return jax.nn.sigmoid(2.0 * (loss - jnp.mean(loss)) / std)


def update_class_loss(class_loss_C, ce_BxL, chosen_BxL, class_BxL, decay: float):
  """EMA of each class's mean loss over its chosen tokens in this batch; classes absent from the
  batch keep their value (as in Yang et al.'s code, momentum 0.999)."""
  num_classes = class_loss_C.shape[0]
  chosen = jnp.asarray(chosen_BxL, jnp.float32).reshape(-1)
  ids = class_BxL.reshape(-1)
  total = jax.ops.segment_sum(jnp.asarray(ce_BxL, jnp.float32).reshape(-1) * chosen, ids,
                              num_segments=num_classes)
  count = jax.ops.segment_sum(chosen, ids, num_segments=num_classes)
  mean = total / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, decay * class_loss_C + (1.0 - decay) * mean, class_loss_C)


def frequency_classes(counts_V, num_classes: int) -> np.ndarray:
  """Classes from frequency: tokens sorted by count, cut into `num_classes` buckets of equal total
  count (class 0 the most frequent tokens). Tokens never seen go to the last class."""
  counts_V = np.asarray(counts_V, np.float64)
  order = np.argsort(-counts_V, kind="stable")
  mass = np.cumsum(counts_V[order]) / max(counts_V.sum(), 1.0)
  bucket = np.minimum((mass * num_classes - 1e-9).astype(np.int64), num_classes - 1)
  bucket = np.maximum(bucket, 0)
  classes = np.empty(len(counts_V), np.int32)
  classes[order] = bucket
  classes[counts_V == 0] = num_classes - 1
  return classes


def load_classes(path: str, vocab_size: int) -> np.ndarray:
  """Token classes from a file: a .npy array of V integers, or text with one `token_id class`
  pair per line (ids not listed get class 0). Classes must be 0..C-1."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"masking.classes_path={path} does not exist; give a .npy array of "
                            f"{vocab_size} class ids or a text file of `token_id class` lines.")
  if path.endswith(".npy"):
    classes = np.asarray(np.load(path), np.int64)
    if classes.shape != (vocab_size,):
      raise ValueError(f"masking.classes_path={path} holds shape {classes.shape}; it must be "
                       f"[{vocab_size}] (one class per token id of the tokenizer).")
  else:
    classes = np.zeros(vocab_size, np.int64)
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
          continue
        try:
          token, cls = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
          raise ValueError(f"{path}:{line_no}: expected `token_id class`, got {line.strip()!r}.")
        if not 0 <= token < vocab_size:
          raise ValueError(f"{path}:{line_no}: token id {token} outside [0, {vocab_size}).")
        classes[token] = cls
  if classes.min() < 0:
    raise ValueError(f"masking.classes_path={path}: class ids must be >= 0.")
  return classes.astype(np.int32)
