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

This module holds the head itself. Its training objective (the masking draw, the loss, the
frozen backbones) is mdlm.objectives.maria; its infiller (one denoiser pass, then KV-cached
left-to-right decoding) is mdlm.sampling.maria. Only W is trained: it is the one `MariaWeight`
variable (filter `TRAINABLE`), and the backbones' hidden states pass through stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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


def masked_fraction(xt_BxL, mask_id: int, token_mask_BxL=None):
  """Fraction of real tokens that are masked, per row (the denoiser's noise level)."""
  masked = jnp.asarray(xt_BxL) == mask_id
  real = jnp.ones(masked.shape, bool) if token_mask_BxL is None else jnp.asarray(token_mask_BxL,
                                                                                   bool)
  return jnp.sum(masked & real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)
