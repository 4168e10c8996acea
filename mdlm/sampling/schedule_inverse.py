"""The inverse of a noise schedule: the time t at which a token is masked with probability p.

Why samplers need it: a time-conditioned denoiser was trained on inputs whose real tokens were
masked with probability schedule.mask_prob(t) = 1 - alpha(t), and it reads that noise level (the
adapter in mdlm.sampling.denoisers maps t through the schedule). A sampler that does not follow a
time grid (confidence remasking) knows only how much of its sequence is masked; to show the model
the noise level it was trained on, it must hand it the t with mask_prob(t) = that fraction. With
the log-linear schedule t is nearly the fraction itself; with any other schedule (cosine, ...) it
is not.

Every schedule of mdlm.schedules has a closed form, written here in terms of p = 1 - alpha so that
small noise levels keep their relative precision in float32. Any other schedule (a subclass, or
one defined elsewhere) is inverted by bisection, which needs only that alpha is non-increasing in
t; it runs inside jit (a fixed number of halvings in a fori_loop).

Noise levels outside the schedule's range [mask_prob(0), mask_prob(1)] map to the nearest end
(t = 0 or t = 1): e.g. a fully masked sequence under a schedule whose 1 - alpha(1) = 1 - eps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdlm import schedules as schedules_lib

# [0, 1] halved 64 times: below float32 resolution of t except near 0, where the interval
# 2^-64 still resolves steep schedules (alpha = 1 - t^0.5 to 1e-10).
BISECTION_STEPS = 64


def time_at_mask_prob(schedule, p):
  """t in [0, 1] with schedule.mask_prob(t) = p (elementwise; jit-compatible)."""
  p = jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)
  closed = _closed_form(schedule)
  t = closed(schedule, p) if closed is not None else bisect(schedule, p)
  return jnp.clip(t, 0.0, 1.0)


def time_at_alpha(schedule, alpha):
  """t in [0, 1] with schedule.alpha(t) = alpha: the inverse of alpha."""
  return time_at_mask_prob(schedule, 1.0 - jnp.asarray(alpha, jnp.float32))


def bisect(schedule, p, steps: int = BISECTION_STEPS):
  """t with mask_prob(t) = p by bisection on [0, 1]; needs only a non-decreasing mask_prob."""
  p = jnp.asarray(p, jnp.float32)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = schedule.mask_prob(mid) < p
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, steps, halve, (jnp.zeros_like(p), jnp.ones_like(p)))
  return 0.5 * (lo + hi)


def _loglinear(s, p):  # p = (1 - eps) t
  return p / (1.0 - s.eps)


def _cosine(s, p):  # p = (1 - eps)(1 - cos x) = 2 (1 - eps) sin^2(x / 2), x = pi t / 2
  r = jnp.clip(p / (1.0 - s.eps), 0.0, 1.0)
  return (4.0 / math.pi) * jnp.arcsin(jnp.sqrt(0.5 * r))


def _cosine_squared(s, p):  # p = (1 - eps) sin^2(x), x = pi t / 2
  r = jnp.clip(p / (1.0 - s.eps), 0.0, 1.0)
  # atan2 keeps both ends well conditioned (arcsin is not near r = 1).
  return (2.0 / math.pi) * jnp.arctan2(jnp.sqrt(r), jnp.sqrt(1.0 - r))


def _linear_sigma(s, p):  # sigma = -log(1 - p) = sigma_min + t (sigma_max - sigma_min)
  sigma = -jnp.log1p(-p)
  return (sigma - s.sigma_min) / (s.sigma_max - s.sigma_min)


def _geometric(s, p):  # log sigma = log sigma_min + t log(sigma_max / sigma_min)
  sigma = -jnp.log1p(-p)
  return jnp.log(sigma / s.sigma_min) / math.log(s.sigma_max / s.sigma_min)


def _polynomial(s, p):  # p = t^k
  return p ** (1.0 / s.k)


_CLOSED_FORMS = {
    schedules_lib.LogLinear: _loglinear,
    schedules_lib.Cosine: _cosine,
    schedules_lib.CosineSquared: _cosine_squared,
    schedules_lib.LinearSigma: _linear_sigma,
    schedules_lib.Geometric: _geometric,
    schedules_lib.Polynomial: _polynomial,
}


def _closed_form(schedule):
  """The closed-form inverse of exactly this class (a subclass may redefine alpha: bisection)."""
  return _CLOSED_FORMS.get(type(schedule))
