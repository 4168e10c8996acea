"""MARIA: a trained linear head over a frozen denoiser and a frozen AR model.

Israel et al. 2025, "Enabling Autoregressive Models to Fill In Masked Tokens" (MARIA). With
final-norm hidden states h_AR (the causal model on the clean prefix) and h_MLM (the denoiser on
the masked sequence xt), the head predicts a masked position i from

    logits_i = W^T [h_AR(i-1); h_MLM(i)],          W in R^{(D_AR + D_MLM) x V}.

h_AR(i-1) has read x_0 .. x_{i-1} and is the state the AR model uses to predict x_i; at i = 0 no
such state exists and we use the zero vector (the AR expert then contributes flat logits).
W starts as [W_AR / 2; W_MLM / 2] (the two output heads), so the initial logits are
(logits_AR(i-1) + logits_MLM(i)) / 2: a normalised product of experts sqrt(p_AR p_MLM).
The head has V outputs, the real tokens only: the mask can never be predicted (its logit is -inf
by construction).

Training (`maria_loss`) feeds the AR model the clean sequence (teacher forcing) and the denoiser
a masked copy, and scores cross-entropy at the masked positions. Only W is trained: it is the
one `MariaWeight` variable (filter `TRAINABLE`, e.g. nnx.Optimizer(head, tx, wrt=TRAINABLE)); the
trainer (objective=maria) wraps its optimizer with `freeze_backbones`, which gives the backbones
exact zero updates; and the backbones' hidden states pass through stop_gradient, so their
gradients are zero whatever the optimizer.

Infilling (`maria_infill`): one denoiser pass over xt, then left-to-right AR decoding with the
KV cache (mdlm.models.ar); at a masked position the token is drawn from the head, elsewhere the
given token is fed. Optionally the denoiser states are recomputed every k filled tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mdlm import diffusion
from mdlm.models import ar as ar_lib
from mdlm.models.transformer import EMBED, VOCAB, Transformer


class MariaWeight(nnx.Param):
  """The MARIA map W; the only variable that MARIA training updates."""


TRAINABLE = MariaWeight  # nnx filter of the trainable parameters


class MariaHead(nnx.Module):
  """Holds the frozen denoiser (`.denoiser`), the frozen AR model (`.ar`) and W (`.w`)."""

  def __init__(self, denoiser: Transformer, ar_model: Transformer):
    for name, model, kind in (("denoiser", denoiser, "denoiser"), ("ar_model", ar_model, "ar")):
      if not isinstance(model, Transformer) or model.cfg.kind != kind:
        raise ValueError(f"MARIA needs {name} to be an mdlm Transformer of kind {kind!r}; got "
                         f"{getattr(getattr(model, 'cfg', None), 'kind', type(model).__name__)!r}.")
    if denoiser.cfg.vocab_size != ar_model.cfg.vocab_size:
      raise ValueError(
          f"the denoiser (V={denoiser.cfg.vocab_size}) and the AR model "
          f"(V={ar_model.cfg.vocab_size}) must share one tokenizer; train both on the same one.")
    ar_lib.check_causal(ar_model)
    self.denoiser = denoiser
    self.ar = ar_model
    w = jnp.concatenate([ar_model.output_weights(), denoiser.output_weights()], axis=0) / 2.0
    self.w = MariaWeight(jnp.asarray(w, jnp.float32), sharding_names=(EMBED, VOCAB),
                         eager_sharding=False)

  @property
  def mask_id(self) -> int:
    return self.denoiser.mask_id

  @property
  def vocab_size(self) -> int:
    return self.denoiser.cfg.vocab_size

  @property
  def max_seq_len(self) -> int:
    return min(self.denoiser.cfg.max_seq_len, self.ar.cfg.max_seq_len)

  def mlm_states(self, xt_BxL, noise_level_B=None, token_mask_BxL=None):
    """h_MLM: the denoiser's final-norm hidden states on xt, float32, no gradient."""
    if self.denoiser.cfg.time_conditioning and noise_level_B is None:
      noise_level_B = masked_fraction(xt_BxL, self.mask_id, token_mask_BxL)
    hidden = self.denoiser.hidden_states(xt_BxL, noise_level_B, token_mask_BxL=token_mask_BxL)
    return jax.lax.stop_gradient(hidden.astype(jnp.float32))

  def ar_states(self, x_BxL):
    """h_AR(i - 1) at every position i: the causal model's states shifted right, zero at i = 0.

    Right padding needs no key mask here: a causal state never reads later positions.
    """
    hidden = self.ar.hidden_states(x_BxL)
    hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
    return jnp.pad(hidden[:, :-1], ((0, 0), (1, 0), (0, 0)))

  def combine(self, h_ar_prev, h_mlm):
    """W^T [h_AR(i-1); h_MLM(i)] over any leading shape; float32 logits over the V real tokens."""
    h = jnp.concatenate([h_ar_prev, h_mlm], axis=-1).astype(jnp.float32)
    return jnp.einsum("...d,dv->...v", h, self.w[...])

  def __call__(self, x0_BxL, xt_BxL, *, noise_level_B=None, token_mask_BxL=None):
    """Head logits [B, L, V]: position i from the AR model on x0[:i] and the denoiser on xt."""
    return self.combine(self.ar_states(x0_BxL),
                        self.mlm_states(xt_BxL, noise_level_B, token_mask_BxL))


def build_maria(denoiser: Transformer, ar_model: Transformer) -> MariaHead:
  """The MARIA head over two trained backbones, initialised to their product of experts."""
  return MariaHead(denoiser, ar_model)


def freeze_backbones(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
  """`tx` on W alone; the backbones get exact zero updates and no optimizer state.

  params: the head's parameters as a pure dict {"ar": ..., "denoiser": ..., "w": ...} (the
  trainer's layout); the labels are computed from it once, so the transformation also works with
  optax.tree_map_params.
  """
  labels = {k: jax.tree.map(lambda _, k=k: "train" if k == "w" else "frozen", v)
            for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def masked_fraction(xt_BxL, mask_id: int, token_mask_BxL=None):
  """Fraction of real tokens that are masked, per row (the denoiser's noise level)."""
  masked = jnp.asarray(xt_BxL) == mask_id
  real = jnp.ones(masked.shape, bool) if token_mask_BxL is None else jnp.asarray(token_mask_BxL,
                                                                                   bool)
  return jnp.sum(masked & real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)


def masked_token_scores(logits_BxLxV, x0_BxL, counted_BxL):
  """Per sequence: (nll_B, correct_B, count_B) over the counted positions, where nll sums
  -log softmax(logits)[x0] and correct counts argmax == x0. float32."""
  logits = jnp.asarray(logits_BxLxV, jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, jnp.asarray(x0_BxL)[..., None].astype(jnp.int32), -1)[..., 0]
  counted = jnp.asarray(counted_BxL, bool)
  nll_B = jnp.sum(jnp.where(counted, logz - target, 0.0), axis=-1)
  correct_B = jnp.sum(counted & (jnp.argmax(logits, -1) == x0_BxL), axis=-1)
  return nll_B, correct_B.astype(jnp.float32), jnp.sum(counted, axis=-1).astype(jnp.float32)


def maria_corrupt(key, x0_BxL, token_mask_BxL=None, *, mask_id: int, schedule,
                  t_min: float = diffusion.T_MIN, antithetic: bool = True,
                  ratio: float | None = None):
  """MARIA's masking draw: (xt_BxL, noise_B). Every real token is masked independently with
  probability noise_B = schedule.mask_prob(t), t ~ U[t_min, 1) stratified over the batch (or
  the fixed `ratio`)."""
  x0_BxL = jnp.asarray(x0_BxL)
  time_key, mask_key = jax.random.split(key)
  batch_size = x0_BxL.shape[0]
  if ratio is None:
    t_B = diffusion.sample_times(time_key, batch_size, t_min=t_min, antithetic=antithetic)
    noise_B = schedule.mask_prob(t_B)
  else:
    noise_B = jnp.full((batch_size,), ratio, jnp.float32)
  move_BxL = jax.random.uniform(mask_key, x0_BxL.shape) < noise_B[:, None]
  if token_mask_BxL is not None:
    move_BxL = move_BxL & jnp.asarray(token_mask_BxL, bool)
  return jnp.where(move_BxL, jnp.asarray(mask_id, x0_BxL.dtype), x0_BxL), noise_B


def maria_loss(head: MariaHead, batch, key, *, schedule, t_min: float = diffusion.T_MIN,
               antithetic: bool = True, ratio: float | None = None) -> diffusion.LossTerms:
  """One MARIA training draw, as per-sequence diffusion.LossTerms.

  The masked input is batch["xt"] with noise level batch["noise"] when given (the trainer draws
  them over the whole global batch, so it knows the masked-token count before micro-batching);
  otherwise `maria_corrupt` draws them with `key`. nll_sum_B sums the head's cross-entropy over
  the masked positions of each sequence, and num_tokens_B = num_masked_B counts them:
  sum(nll_sum_B) / sum(num_tokens_B) is the mean cross-entropy per masked token.
  """
  x0_BxL = jnp.asarray(batch["tokens"])
  token_mask_BxL = batch.get("token_mask")
  if "xt" in batch:
    xt_BxL, noise_B = jnp.asarray(batch["xt"]), jnp.asarray(batch["noise"])
  else:
    xt_BxL, noise_B = maria_corrupt(key, x0_BxL, token_mask_BxL, mask_id=head.mask_id,
                                    schedule=schedule, t_min=t_min, antithetic=antithetic,
                                    ratio=ratio)
  move_BxL = xt_BxL == head.mask_id
  if token_mask_BxL is not None:
    move_BxL = move_BxL & jnp.asarray(token_mask_BxL, bool)
  logits = head(x0_BxL, xt_BxL, noise_level_B=noise_B, token_mask_BxL=token_mask_BxL)
  nll_B, _, count_B = masked_token_scores(logits, x0_BxL, move_BxL)
  return diffusion.LossTerms(nll_B, count_B, count_B)


class InfillStats(NamedTuple):
  denoiser_passes: jax.Array  # 1 + refreshes
  ar_steps: jax.Array         # one-token AR decode steps
  num_filled: jax.Array       # masked positions filled


@nnx.jit
def _infill(head: MariaHead, key, xt_BxL, token_mask_BxL, temperature, top_p, refresh_every):
  batch, length = xt_BxL.shape
  mask_id = head.mask_id
  to_fill_BxL = (xt_BxL == mask_id) & token_mask_BxL
  has_mask_B = jnp.any(to_fill_BxL, axis=1)
  first_B = jnp.where(has_mask_B, jnp.argmax(to_fill_BxL, axis=1), length)
  last_B = jnp.where(has_mask_B, length - 1 - jnp.argmax(to_fill_BxL[:, ::-1], axis=1), -1)
  start, stop = jnp.min(first_B), jnp.max(last_B) + 1

  h_mlm = head.mlm_states(xt_BxL, None, token_mask_BxL)
  # Prefill the whole sequence: the states before `start` are exact (all given tokens); the cache
  # entries from `start` on are rewritten by the decode steps before any query reads them.
  cache = ar_lib.init_cache(head.ar, batch, length)
  cache, h_ar_all = ar_lib.prefill(head.ar, xt_BxL, cache)
  h_prev = jnp.where(start > 0, h_ar_all[:, jnp.maximum(start - 1, 0)], 0.0).astype(jnp.float32)

  def cond(state):
    return state[0] < stop

  def body(state):
    pos, x_BxL, cache, h_prev, h_mlm, filled_B, fill_steps, refreshes = state
    logits_BxV = head.combine(h_prev, jax.lax.dynamic_index_in_dim(h_mlm, pos, 1, False))
    drawn_B = ar_lib.sample_logits(jax.random.fold_in(key, pos), logits_BxV, temperature, top_p)
    fill_B = jax.lax.dynamic_index_in_dim(to_fill_BxL, pos, 1, False)
    given_B = jax.lax.dynamic_index_in_dim(x_BxL, pos, 1, False)
    token_B = jnp.where(fill_B, drawn_B, given_B).astype(x_BxL.dtype)
    x_BxL = jax.lax.dynamic_update_index_in_dim(x_BxL, token_B, pos, 1)
    cache, h_new = ar_lib.decode_step(head.ar, cache, token_B, pos)
    filled_B = filled_B + fill_B
    # Steps that fill at least one token, counted over the batch: a refresh every k of them keeps
    # every row's denoiser states at most k of its own fills old (exactly every k fills for one
    # sequence), without the batch refreshing whenever any single row reaches a multiple of k.
    filled_any = jnp.any(fill_B)
    fill_steps = fill_steps + filled_any
    refresh = ((refresh_every > 0) & (pos + 1 < stop) & filled_any
               & (fill_steps % jnp.maximum(refresh_every, 1) == 0))
    h_mlm = jax.lax.cond(refresh, lambda: head.mlm_states(x_BxL, None, token_mask_BxL),
                         lambda: h_mlm)
    return (pos + 1, x_BxL, cache, h_new.astype(jnp.float32), h_mlm, filled_B, fill_steps,
            refreshes + refresh)

  init = (start, xt_BxL, cache, h_prev, h_mlm, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  _, x_BxL, _, _, _, filled_B, _, refreshes = jax.lax.while_loop(cond, body, init)
  stats = InfillStats(1 + refreshes, jnp.maximum(stop - start, 0), jnp.sum(filled_B))
  return x_BxL, stats


def maria_infill(key, head: MariaHead, xt_BxL, *, mask_id: int, temperature: float = 1.0,
                 top_p: float = 1.0, refresh_every: int = 0, token_mask_BxL=None):
  """Fills every mask of xt_BxL with the MARIA head; returns (tokens_BxL, stats) with stats
  {"denoiser_passes" (= "nfe"), "ar_steps", "num_filled"}.

  Given tokens (and padding, where token_mask_BxL is False) are copied unchanged. temperature 0 is
  greedy. refresh_every = k > 0 recomputes the denoiser states on the partly filled sequence
  after every k decode steps that fill a token in some row (for one sequence: every k filled
  tokens; in a batch, no row's states are more than k of its fills old); 0 keeps the single
  initial pass.
  """
  if not isinstance(head, MariaHead):
    raise TypeError(f"expected a MariaHead, got {type(head).__name__}.")
  if mask_id != head.mask_id:
    raise ValueError(f"mask_id={mask_id} differs from the models' mask id {head.mask_id}.")
  xt = jnp.asarray(xt_BxL)
  if xt.ndim != 2 or not jnp.issubdtype(xt.dtype, jnp.integer):
    raise ValueError(f"xt must be integer token ids [batch, length]; got {xt.dtype} {xt.shape}.")
  if xt.shape[1] > head.max_seq_len:
    raise ValueError(f"sequence length {xt.shape[1]} exceeds the backbones' max_seq_len="
                     f"{head.max_seq_len}; infill a shorter window.")
  if xt.size and (int(xt.min()) < 0 or int(xt.max()) > mask_id):
    raise ValueError(f"token ids must lie in [0, {mask_id}] (the mask included); got "
                     f"[{int(xt.min())}, {int(xt.max())}].")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or refresh_every < 0:
    raise ValueError(f"need temperature >= 0, top_p in (0, 1], refresh_every >= 0; got "
                     f"{temperature}, {top_p}, {refresh_every}.")
  # An all-true mask rather than None: one compilation serves padded and unpadded batches.
  mask = (jnp.ones(xt.shape, bool) if token_mask_BxL is None
          else jnp.asarray(token_mask_BxL, bool))
  if mask.shape != xt.shape:
    raise ValueError(f"token_mask shape {mask.shape} differs from xt shape {xt.shape}.")
  tokens, stats = _infill(head, key, xt.astype(jnp.int32), mask, jnp.float32(temperature),
                          jnp.float32(top_p), jnp.int32(refresh_every))
  out = {k: int(v) for k, v in stats._asdict().items()}
  out["nfe"] = out["denoiser_passes"]  # the samplers' name for denoiser calls
  return tokens, out
