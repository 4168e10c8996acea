"""Throughput accounting: device peak FLOP/s for MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peaks per chip (vendor figures), used for MFU on accelerators.
_PEAK_BF16 = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def median_seconds(fn, *args, repeats: int = 10) -> float:
  """Median wall time of fn(*args) over `repeats` calls, after one call that compiles and warms
  up; each call is waited for (block_until_ready), so asynchronous dispatch is not timed."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
  """Measured FLOP/s of a jitted n x n matmul on the default device (median of repeats)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2.0 * n ** 3 / median_seconds(f, a, b, repeats=repeats)


@functools.lru_cache(maxsize=None)
def device_peak_flops(dtype_name: str = "float32") -> float:
  """Peak FLOP/s of all devices: the vendor bf16 figure on GPU/TPU, a measured matmul on CPU."""
  devices = jax.devices()
  kind = devices[0].device_kind
  if devices[0].platform != "cpu":
    for name, peak in _PEAK_BF16.items():
      if name.lower() in kind.lower():
        return peak * len(devices)
  return matmul_peak(jnp.dtype(dtype_name)) * len(devices)
