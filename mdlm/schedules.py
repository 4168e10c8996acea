"""Noise schedules for absorbing-state (masked) diffusion.

A schedule is the map t -> alpha(t), the probability that a token is still clean at time t in
[0, 1]; alpha decreases from ~1 at t=0 to ~0 at t=1. Everything the objective needs follows from
it: alpha'(t) and the continuous-time NELBO weight

    w(t) = -alpha'(t) / (1 - alpha(t))            (MDLM eq. 10; MD4 eq. 5)

Each weight is written in a closed form that avoids the 0/0 at t -> 0 (e.g. exactly 1/t for the
log-linear schedule), so it is accurate in float32 for t as small as the time sampler produces.
Schedules are frozen dataclasses: hashable, so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp


class Schedule:
  """Interface: alpha(t), dalpha(t) = d alpha / dt, weight(t) = -dalpha / (1 - alpha)."""

  name: str = ""

  def alpha(self, t):
    raise NotImplementedError

  def dalpha(self, t):
    raise NotImplementedError

  def weight(self, t):
    t = jnp.asarray(t, jnp.float32)
    return -self.dalpha(t) / (1.0 - self.alpha(t))

  def mask_prob(self, t):
    """1 - alpha(t): the probability that a token is masked at time t."""
    return 1.0 - self.alpha(t)


@dataclasses.dataclass(frozen=True)
class LogLinear(Schedule):
  """alpha(t) = 1 - (1 - eps) t (MDLM's default); w(t) = 1/t exactly."""

  eps: float = 1e-3
  name: str = dataclasses.field(default="loglinear", init=False)

  def alpha(self, t):
    return 1.0 - (1.0 - self.eps) * jnp.asarray(t, jnp.float32)

  def dalpha(self, t):
    return jnp.full_like(jnp.asarray(t, jnp.float32), -(1.0 - self.eps))

  def weight(self, t):
    return 1.0 / jnp.asarray(t, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """alpha(t) = eps + (1 - eps) cos(pi t / 2); w(t) = (pi/2) / tan(pi t / 4)."""

  eps: float = 1e-3
  name: str = dataclasses.field(default="cosine", init=False)

  def alpha(self, t):
    return self.eps + (1.0 - self.eps) * jnp.cos(0.5 * jnp.pi * jnp.asarray(t, jnp.float32))

  def dalpha(self, t):
    return -(1.0 - self.eps) * 0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * jnp.asarray(t, jnp.float32))

  def weight(self, t):
    # sin(x) / (1 - cos(x)) = cot(x / 2), with x = pi t / 2.
    return 0.5 * jnp.pi / jnp.tan(0.25 * jnp.pi * jnp.asarray(t, jnp.float32))


@dataclasses.dataclass(frozen=True)
class CosineSquared(Schedule):
  """alpha(t) = eps + (1 - eps) cos^2(pi t / 2); w(t) = pi / tan(pi t / 2)."""

  eps: float = 1e-3
  name: str = dataclasses.field(default="cosine_squared", init=False)

  def alpha(self, t):
    return self.eps + (1.0 - self.eps) * jnp.cos(0.5 * jnp.pi * jnp.asarray(t, jnp.float32)) ** 2

  def dalpha(self, t):
    return -(1.0 - self.eps) * 0.5 * jnp.pi * jnp.sin(jnp.pi * jnp.asarray(t, jnp.float32))

  def weight(self, t):
    # (pi/2) sin(pi t) / sin^2(pi t / 2) = pi cot(pi t / 2).
    # w(1) = 0 exactly; float32 rounding of pi/2 would otherwise give a tiny negative value.
    return jnp.maximum(jnp.pi / jnp.tan(0.5 * jnp.pi * jnp.asarray(t, jnp.float32)), 0.0)


@dataclasses.dataclass(frozen=True)
class _SigmaSchedule(Schedule):
  """alpha = exp(-sigma(t)); w = sigma'(t) / expm1(sigma(t)) (stable for small sigma)."""

  sigma_min: float = 1e-3
  sigma_max: float = 7.0

  def sigma(self, t):
    raise NotImplementedError

  def dsigma(self, t):
    raise NotImplementedError

  def alpha(self, t):
    return jnp.exp(-self.sigma(jnp.asarray(t, jnp.float32)))

  def dalpha(self, t):
    t = jnp.asarray(t, jnp.float32)
    return -self.dsigma(t) * jnp.exp(-self.sigma(t))

  def weight(self, t):
    t = jnp.asarray(t, jnp.float32)
    return self.dsigma(t) / jnp.expm1(self.sigma(t))


@dataclasses.dataclass(frozen=True)
class LinearSigma(_SigmaSchedule):
  """sigma(t) = sigma_min + t (sigma_max - sigma_min), alpha = exp(-sigma)."""

  name: str = dataclasses.field(default="linear", init=False)

  def sigma(self, t):
    return self.sigma_min + t * (self.sigma_max - self.sigma_min)

  def dsigma(self, t):
    return jnp.full_like(t, self.sigma_max - self.sigma_min)


@dataclasses.dataclass(frozen=True)
class Geometric(_SigmaSchedule):
  """sigma(t) = sigma_min^(1-t) sigma_max^t, alpha = exp(-sigma)."""

  name: str = dataclasses.field(default="geometric", init=False)

  def sigma(self, t):
    return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

  def dsigma(self, t):
    return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
  """alpha(t) = 1 - t^k (MD4's polynomial family); w(t) = k / t."""

  k: float = 1.0
  name: str = dataclasses.field(default="polynomial", init=False)

  def alpha(self, t):
    return 1.0 - jnp.asarray(t, jnp.float32) ** self.k

  def dalpha(self, t):
    return -self.k * jnp.asarray(t, jnp.float32) ** (self.k - 1.0)

  def weight(self, t):
    return self.k / jnp.asarray(t, jnp.float32)


REGISTRY: dict[str, Callable[..., Schedule]] = {
    "loglinear": LogLinear,
    "cosine": Cosine,
    "cosine_squared": CosineSquared,
    "linear": LinearSigma,
    "geometric": Geometric,
    "polynomial": Polynomial,
}


def get(name: str, **params) -> Schedule:
  """Returns the schedule called `name` with the given parameters, e.g. get("polynomial", k=2)."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown noise schedule {name!r}; choose one of {sorted(REGISTRY)}.")
  cls = REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = set(params) - fields
  if unknown:
    raise ValueError(
        f"Schedule {name!r} got unknown parameters {sorted(unknown)}; it accepts {sorted(fields)}.")
  schedule = cls(**params)
  for key in ("eps", "sigma_min", "sigma_max", "k"):
    if key in fields and not getattr(schedule, key) > 0:
      raise ValueError(f"Schedule {name!r}: {key} must be positive, got {getattr(schedule, key)}.")
  if "eps" in fields and not schedule.eps < 1:
    raise ValueError(f"Schedule {name!r}: eps must be < 1, got {schedule.eps}.")
  if "sigma_max" in fields and not schedule.sigma_max > schedule.sigma_min:
    raise ValueError(f"Schedule {name!r}: need sigma_max > sigma_min.")
  return schedule
