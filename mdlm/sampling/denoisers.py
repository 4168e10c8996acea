"""Denoiser callables: the one thing a sampler knows about a model.

A denoiser is any callable `denoise(xt_BxL, t_B) -> logits_BxLxV` over the V real tokens (a
(V + 1)-th mask column is tolerated; SUBS removes it). The sampler applies SUBS itself. Optional
attributes the samplers read when present:

  mask_id          the absorbing token id (checked against the sampler's mask_id)
  max_length       the longest sequence the denoiser accepts
  time_conditioned whether the output depends on t (informational: the cached samplers here skip
                   only calls whose output would be unused, which is exact either way)
  schedule         the noise schedule a time-conditioned denoiser reads t through
                   (mask_prob(t) = 1 - alpha(t)); the confidence sampler, which has no time grid,
                   inverts it to pass the t of the input's masked fraction (at_masked_fraction)

Two stages (optional). A sampler needs predictions only at the positions it fills, and in a small
model the V-way output head is most of the forward pass (the tiny preset, d = 64 and V = 4096:
two thirds of the FLOPs, half of the time on a CPU). A denoiser may therefore also offer

  features(xt_BxL, t_B) -> F              everything that looks at the whole sequence
  logits_at(F, positions_BxS) -> logits_BxSxV   the head at the given positions only

with logits_at(features(xt, t), idx) equal to denoise(xt, t) gathered at idx, up to the float
rounding of a smaller matmul (XLA may pick another kernel for a few rows: differences of about
one ulp, which can flip a near-tie). `stages(denoise)` returns this pair for any denoiser, and
the samplers call only these two when both exist: a subclass that overrides `__call__` alone is
bypassed. For a plain callable F is the full logits and logits_at gathers them exactly.

Key/value caching (optional; the approximate caches of Fast-dLLM, Wu et al. 2025, "Fast-dLLM:
Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding", used by
mdlm.sampling.fast_dllm). A denoiser may also offer

  kv_fill(xt_BxL, t_B) -> (cache, F)      the full pass of `features`, plus every layer's keys and
                                          values at every position
  kv_window(cache, xt_BxL, start, width, t_B) -> F_W   positions start..start+width-1 of xt
                                          recomputed, attending to themselves and to the cached
                                          keys/values of every other position

where F_W feeds logits_at with window-relative positions. Both take the whole xt (a wrapper reads
its time, or builds its guidance branch, from the whole sequence). `has_kv_cache(denoise)` says
whether a denoiser (or the denoiser inside a guidance wrapper) has them; a plain callable has no
keys or values to cache.

Samplers are jit-compiled with the denoiser as an argument. A denoiser that is a pytree (the
model adapter and the guidance wrapper below) passes its arrays as traced inputs, so parameters
are not baked into the program and a new checkpoint of the same architecture reuses the compiled
sampler; a plain function is treated as a static argument (hashed by identity).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdlm import sharding
from mdlm.models import kv_cache
from mdlm.sampling import schedule_inverse

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def gather_rows(x_BxLx, idx_BxS):
  """x[b, idx[b, s]] for every row ([B, L] or [B, L, ...] input); out-of-range indices (the
  'empty slot' value L) are clamped (callers mask those slots). take_along_axis: on CPU it is an
  order of magnitude faster than the equivalent fancy indexing for [B, L, V] slabs."""
  idx_BxS = jnp.minimum(idx_BxS, x_BxLx.shape[1] - 1)
  extra = x_BxLx.ndim - 2
  return jnp.take_along_axis(x_BxLx, idx_BxS.reshape(idx_BxS.shape + (1,) * extra), axis=1)


def stages(denoise) -> tuple[Callable, Callable]:
  """(features, logits_at) of a denoiser (see the module docstring); a plain callable's features
  are its logits and logits_at gathers them."""
  if hasattr(denoise, "features") and hasattr(denoise, "logits_at"):
    return denoise.features, denoise.logits_at
  return denoise, gather_rows


class _GraphKey:
  """Hashable holder of an nnx GraphDef (which holds an unhashable ModelConfig)."""

  def __init__(self, graphdef, key: str):
    self.graphdef, self.key = graphdef, key

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _GraphKey) and self.key == other.key and self.graphdef == other.graphdef


@jax.tree_util.register_pytree_node_class
class ModelDenoiser:
  """An mdlm Transformer (kind "denoiser") as a denoiser callable.

  The model is conditioned on noise_level = schedule.mask_prob(t) = 1 - alpha(t) when its config
  has time_conditioning; otherwise t is ignored.
  """

  def __init__(self, graph: _GraphKey, state, schedule, time_conditioned: bool, mask_id: int,
               vocab_size: int, max_length: int):
    self.graph, self.state, self.schedule = graph, state, schedule
    self.time_conditioned, self.mask_id = time_conditioned, mask_id
    self.vocab_size, self.max_length = vocab_size, max_length

  def _model(self):
    return nnx.merge(self.graph.graphdef, self.state)

  def _noise(self, t_B):
    return self.schedule.mask_prob(t_B) if self.time_conditioned else None

  def __call__(self, xt_BxL, t_B):
    return self._model()(xt_BxL, self._noise(t_B))

  def features(self, xt_BxL, t_B):
    """The final-norm hidden states [B, L, D]."""
    return self._model().hidden_states(xt_BxL, self._noise(t_B))

  def logits_at(self, hidden_BxLxD, positions_BxS):
    """The output head at the given positions only: [B, S, V]."""
    return self._model().logits(gather_rows(hidden_BxLxD, positions_BxS))

  def kv_fill(self, xt_BxL, t_B):
    """(cache, hidden [B, L, D]): the whole sequence in one pass (mdlm.models.kv_cache's window
    over every position, everything visible: the forward pass regrouped), keeping its keys and
    values."""
    model = self._model()
    batch, length = xt_BxL.shape
    return kv_cache.forward_window(model, kv_cache.init_cache(model, batch, length), xt_BxL, 0,
                                   jnp.ones((1, 1, length), bool), noise_level_B=self._noise(t_B))

  def kv_window(self, cache, xt_BxL, start, width: int, t_B):
    """hidden [B, width, D] of positions start..start+width-1, attending to their own fresh keys
    and values and to the cached ones of every other position; the cache is not changed."""
    tokens_BxW = jax.lax.dynamic_slice_in_dim(xt_BxL, start, width, axis=1)
    _, hidden = kv_cache.forward_window(self._model(), cache, tokens_BxW, start,
                                        jnp.ones((1, 1, cache.length), bool),
                                        noise_level_B=self._noise(t_B), write=False)
    return hidden

  def tree_flatten(self):
    return (self.state,), (self.graph, self.schedule, self.time_conditioned, self.mask_id,
                           self.vocab_size, self.max_length)

  @classmethod
  def tree_unflatten(cls, aux, children):
    graph, schedule, tc, mask_id, vocab, max_len = aux
    return cls(graph, children[0], schedule, tc, mask_id, vocab, max_len)


def shard_denoiser(denoise: ModelDenoiser, mesh, rules) -> ModelDenoiser:
  """The same denoiser with its parameters placed on `mesh` by the logical-axis rules the trainer
  uses (mdlm.sharding; config `mesh.rules`). A sampler called with it and with xt placed by
  `mdlm.sharding.batch_sharding(mesh)` then runs data-, FSDP- and tensor-parallel under jit: the
  samplers work row by row, so the batch sharding carries through their loops."""
  if not isinstance(denoise, ModelDenoiser):
    raise TypeError(f"shard_denoiser needs a model denoiser (denoiser_from_model), got "
                    f"{type(denoise).__name__}; wrap a sharded one with guided() afterwards.")
  state = denoise.state
  placements = sharding.tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(state)),
                                       sharding.rules_dict(rules), mesh,
                                       nnx.to_pure_dict(state))
  placed = jax.tree.map(lambda x: x, state)  # a copy: the caller's denoiser keeps its arrays
  nnx.replace_by_pure_dict(placed, jax.device_put(nnx.to_pure_dict(state), placements))
  return ModelDenoiser(denoise.graph, placed, denoise.schedule, denoise.time_conditioned,
                       denoise.mask_id, denoise.vocab_size, denoise.max_length)


def denoiser_from_model(model, schedule=None) -> ModelDenoiser:
  """Wraps a trained mdlm denoiser (mdlm.models.Transformer) as `denoise(xt, t) -> logits`.

  schedule: the training noise schedule (mdlm.schedules); required when the model is
  time-conditioned, since the model reads 1 - alpha(t), not t.
  """
  cfg = model.cfg
  if cfg.kind != "denoiser":
    raise ValueError(f"denoiser_from_model needs a bidirectional denoiser (model kind "
                     f"'denoiser'); got kind {cfg.kind!r}. AR models serve as evaluators "
                     "(mdlm.sampling.metrics.generative_perplexity) instead.")
  if cfg.time_conditioning and schedule is None:
    raise ValueError("This model is time-conditioned: pass its training noise schedule, e.g. "
                     "denoiser_from_model(model, run.config.noise.build()).")
  graphdef, state = nnx.split(model)
  return ModelDenoiser(_GraphKey(graphdef, repr(cfg)), state, schedule, bool(cfg.time_conditioning),
                       int(model.mask_id), int(cfg.vocab_size), int(cfg.max_seq_len))


@jax.tree_util.register_pytree_node_class
class Guided:
  """Unsupervised classifier-free guidance (Nie et al. 2024, "Scaling up Masked Diffusion Models
  on Text", SMDM): logits = (1 + w) logits(xt) - w logits(xt with the prompt masked).

  Both passes run as one call of the inner denoiser on a 2B batch, at the t the sampler passes;
  under the confidence sampler each branch gets the t of its own masked fraction instead
  (at_masked_fraction).
  """

  def __init__(self, denoise: Denoiser, prompt_mask, w, mask_id: int):
    self.denoise, self.prompt_mask, self.w, self.mask_id = denoise, prompt_mask, w, mask_id

  @property
  def max_length(self):
    return getattr(self.denoise, "max_length", None)

  @property
  def time_conditioned(self):
    return getattr(self.denoise, "time_conditioned", True)

  def _both(self, xt_BxL, t_B):
    """The [2B] batch of the conditional and the prompt-masked inputs, and its times."""
    prompt_BxL = jnp.broadcast_to(self.prompt_mask, xt_BxL.shape)
    unconditional = jnp.where(prompt_BxL, jnp.asarray(self.mask_id, xt_BxL.dtype), xt_BxL)
    t_B = jnp.broadcast_to(t_B, xt_BxL.shape[:1])
    return jnp.concatenate([xt_BxL, unconditional]), jnp.concatenate([t_B, t_B])

  def _mix(self, logits_2BxSxV):
    cond, uncond = jnp.split(jnp.asarray(logits_2BxSxV, jnp.float32), 2)
    return (1.0 + self.w) * cond - self.w * uncond

  def __call__(self, xt_BxL, t_B):
    return self._mix(self.denoise(*self._both(xt_BxL, t_B)))

  def features(self, xt_BxL, t_B):
    return stages(self.denoise)[0](*self._both(xt_BxL, t_B))

  def logits_at(self, features, positions_BxS):
    both_2BxS = jnp.concatenate([positions_BxS, positions_BxS])
    return self._mix(stages(self.denoise)[1](features, both_2BxS))

  def kv_fill(self, xt_BxL, t_B):
    """One cache for both branches (2B rows)."""
    return self.denoise.kv_fill(*self._both(xt_BxL, t_B))

  def kv_window(self, cache, xt_BxL, start, width: int, t_B):
    both_2BxL, t_2B = self._both(xt_BxL, t_B)
    return self.denoise.kv_window(cache, both_2BxL, start, width, t_2B)

  def tree_flatten(self):
    return (self.denoise, self.prompt_mask, self.w), (self.mask_id,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


def guided(denoise: Denoiser, prompt_mask, w: float, *, mask_id: Optional[int] = None) -> Guided:
  """Wraps `denoise` into its CFG version; prompt_mask [B, L] or [L] marks the prompt tokens.

  mask_id defaults to denoise.mask_id (present on model denoisers).
  """
  mask_id = getattr(denoise, "mask_id", None) if mask_id is None else mask_id
  if mask_id is None:
    raise ValueError("guided: pass mask_id= (this denoiser has no mask_id attribute).")
  prompt_mask = np.asarray(prompt_mask, bool) if not isinstance(prompt_mask, jax.Array) else prompt_mask
  if prompt_mask.ndim not in (1, 2):
    raise ValueError(f"prompt_mask must be [L] or [B, L], got shape {prompt_mask.shape}.")
  if not np.isfinite(w):
    raise ValueError(f"guidance weight w must be finite, got {w}.")
  return Guided(denoise, jnp.asarray(prompt_mask), jnp.asarray(w, jnp.float32), int(mask_id))


# ---- the time of samplers without a time grid ---------------------------------------------------


class _AtMaskedFraction:
  """A denoiser called at the t its own input implies (see at_masked_fraction). Built inside a
  traced sampler loop only, so it needs no pytree registration."""

  def __init__(self, denoise: Denoiser, mask_id: int):
    self.denoise, self.mask_id = denoise, mask_id
    self.schedule = getattr(denoise, "schedule", None)
    self.time_conditioned = getattr(denoise, "time_conditioned", True)

  def time(self, xt_BxL):
    """t_B with mask_prob(t) = the fraction of the row's tokens that are masked."""
    fraction_B = jnp.mean(xt_BxL == self.mask_id, axis=1, dtype=jnp.float32)
    if self.schedule is None or not self.time_conditioned:
      return fraction_B
    return schedule_inverse.time_at_mask_prob(self.schedule, fraction_B)

  def __call__(self, xt_BxL, t_B):
    del t_B  # replaced by the time of the input itself
    return self.denoise(xt_BxL, self.time(xt_BxL))

  def features(self, xt_BxL, t_B):
    del t_B
    return stages(self.denoise)[0](xt_BxL, self.time(xt_BxL))

  def logits_at(self, features, positions_BxS):
    return stages(self.denoise)[1](features, positions_BxS)

  def kv_fill(self, xt_BxL, t_B):
    del t_B
    return self.denoise.kv_fill(xt_BxL, self.time(xt_BxL))

  def kv_window(self, cache, xt_BxL, start, width: int, t_B):
    """At the time of the whole sequence (the cached keys/values keep the time of their pass)."""
    del t_B
    return self.denoise.kv_window(cache, xt_BxL, start, width, self.time(xt_BxL))


def has_kv_cache(denoise) -> bool:
  """Whether the denoiser offers kv_fill / kv_window (module docstring), through a guidance
  wrapper."""
  if isinstance(denoise, Guided):
    return has_kv_cache(denoise.denoise)
  return hasattr(denoise, "kv_fill") and hasattr(denoise, "kv_window")


def at_masked_fraction(denoise: Denoiser, mask_id: int) -> Denoiser:
  """The denoiser called, whatever t it is given, at the t whose mask probability is the fraction
  of its input's tokens that are masked.

  Why: a time-conditioned model was trained on noise level schedule.mask_prob(t) computed over
  all real tokens of the sequence; a sampler that commits tokens by confidence has no time grid,
  only a masked fraction, and the t that reproduces it depends on the schedule (the inverse in
  mdlm.sampling.schedule_inverse; t = the fraction for a denoiser without a `schedule`). Every
  position of a sampled sequence is a real token (samplers have no padding). Under guidance each
  branch gets its own time: the prompt-masked input of the unconditional branch is more masked
  than the conditional one.
  """
  if isinstance(denoise, Guided):
    return Guided(at_masked_fraction(denoise.denoise, mask_id), denoise.prompt_mask, denoise.w,
                  denoise.mask_id)
  return _AtMaskedFraction(denoise, mask_id)


# ---- passing a denoiser through jax.jit ----------------------------------------------------------

_ARRAY = object()  # placeholder for a traced leaf in the static half


class _Static:
  """The non-array part of a callable pytree: its treedef and its non-array leaves."""

  def __init__(self, treedef, leaves: tuple):
    self.treedef, self.leaves = treedef, leaves

  def __hash__(self):
    return hash((self.treedef, self.leaves))

  def __eq__(self, other):
    return (isinstance(other, _Static) and self.treedef == other.treedef
            and self.leaves == other.leaves)


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def partition(fn) -> tuple[_Static, list]:
  """Splits a (pytree) callable into a hashable static part and a list of arrays."""
  leaves, treedef = jax.tree_util.tree_flatten(fn)
  static = tuple(_ARRAY if _is_array(l) else l for l in leaves)
  return _Static(treedef, static), [l for l in leaves if _is_array(l)]


def combine(static: _Static, arrays: list):
  it = iter(arrays)
  leaves = [next(it) if l is _ARRAY else l for l in static.leaves]
  return jax.tree_util.tree_unflatten(static.treedef, leaves)
