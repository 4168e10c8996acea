"""Schedules: endpoints, derivative vs autodiff, weight identity, stability, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm import schedules

ALL = [
    ("loglinear", {}), ("cosine", {}), ("cosine_squared", {}), ("linear", {}),
    ("geometric", {}), ("polynomial", {"k": 1.0}), ("polynomial", {"k": 3.0}),
]
T = jnp.linspace(0.01, 0.99, 41)


@pytest.mark.parametrize("name,params", ALL)
def test_endpoints_and_monotone(name, params):
  s = schedules.get(name, **params)
  a0, a1 = float(s.alpha(0.0)), float(s.alpha(1.0))
  assert a0 == pytest.approx(1.0, abs=2e-3)
  assert a1 == pytest.approx(0.0, abs=2e-3)
  alphas = np.asarray(s.alpha(jnp.linspace(0, 1, 101)))
  assert np.all(np.diff(alphas) < 0)


@pytest.mark.parametrize("name,params", ALL)
def test_derivative_matches_autodiff(name, params):
  s = schedules.get(name, **params)
  auto = jax.vmap(jax.grad(lambda t: s.alpha(t)))(T)
  np.testing.assert_allclose(s.dalpha(T), auto, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,params", ALL)
def test_weight_is_minus_dalpha_over_one_minus_alpha(name, params):
  s = schedules.get(name, **params)
  t64 = np.asarray(T, np.float64)
  # Independent float64 evaluation of -alpha'/(1 - alpha) by central differences.
  h = 1e-6
  alpha64 = {
      "loglinear": lambda t: 1 - (1 - 1e-3) * t,
      "cosine": lambda t: 1e-3 + (1 - 1e-3) * np.cos(np.pi * t / 2),
      "cosine_squared": lambda t: 1e-3 + (1 - 1e-3) * np.cos(np.pi * t / 2) ** 2,
      "linear": lambda t: np.exp(-(1e-3 + t * (7 - 1e-3))),
      "geometric": lambda t: np.exp(-(1e-3 ** (1 - t) * 7.0 ** t)),
      "polynomial": lambda t: 1 - t ** params.get("k", 1.0),
  }[name]
  d = (alpha64(t64 + h) - alpha64(t64 - h)) / (2 * h)
  expected = -d / (1 - alpha64(t64))
  np.testing.assert_allclose(s.weight(T), expected, rtol=2e-4)
  # The naive float32 ratio agrees away from t = 0 (near 0 it loses digits, which is why the
  # schedules use closed forms).
  t_far = T[T > 0.2]
  np.testing.assert_allclose(s.weight(t_far), -s.dalpha(t_far) / (1 - s.alpha(t_far)), rtol=2e-3)


def test_loglinear_weight_is_exactly_one_over_t():
  s = schedules.get("loglinear")
  t = jnp.asarray([1e-3, 0.1, 0.5, 0.999, 1.0], jnp.float32)
  np.testing.assert_array_equal(np.asarray(s.weight(t)), np.asarray(1.0 / t))


@pytest.mark.parametrize("name,params", ALL)
def test_weight_finite_and_positive_at_small_t_under_jit(name, params):
  s = schedules.get(name, **params)
  w = np.asarray(jax.jit(s.weight)(jnp.asarray([1e-5, 1e-3, 0.5, 1.0], jnp.float32)))
  assert np.all(np.isfinite(w)) and np.all(w[:3] > 0) and w[3] >= 0


def test_schedules_are_hashable_static_args():
  s = schedules.get("cosine")
  f = jax.jit(lambda t, sched: sched.alpha(t), static_argnums=1)
  assert float(f(0.0, s)) == pytest.approx(1.0, abs=1e-6)
  assert schedules.get("cosine") == s and hash(schedules.get("cosine")) == hash(s)


def test_bad_schedule_input():
  with pytest.raises(ValueError, match="Unknown noise schedule 'cosinus'"):
    schedules.get("cosinus")
  with pytest.raises(ValueError, match="unknown parameters"):
    schedules.get("loglinear", k=2)
  with pytest.raises(ValueError, match="eps must be"):
    schedules.get("cosine", eps=1.5)
  with pytest.raises(ValueError, match="sigma_max > sigma_min"):
    schedules.get("linear", sigma_min=5.0, sigma_max=1.0)
