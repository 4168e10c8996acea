"""glibc malloc settings for XLA's CPU runtime, applied once when mdlm is imported.

XLA's CPU client allocates every step's buffers afresh (activations, gradients, the temporaries
of each fusion) from its worker threads. Under glibc's defaults each of those threads gets its own
malloc arena, large blocks are fresh `mmap`s handed back to the kernel on free, and free memory at
the top of the heap is trimmed: every step faults its working set back in, page by page. On the
2-core development CPU that was a quarter of a training step's CPU time, spent in the kernel
(experiments/README.md, "Host memory"). One arena, no `mmap` for large blocks and no trimming
keep freed memory mapped in the process for the next step. The process then holds its peak heap
until it exits, which a training, evaluation or sampling job does anyway.

Set MDLM_HOST_MALLOC=default to keep glibc's defaults. Elsewhere than glibc (macOS, musl) this is a
no-op. The settings cap arenas created after the call: import mdlm before jax to get the full
effect (the command-line entry points do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim

applied = False


def tune() -> bool:
  """Applies SETTINGS through mallopt (glibc only); True when all were accepted."""
  global applied
  if applied or os.environ.get("MDLM_HOST_MALLOC", "tuned") == "default":
    return applied
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return applied
