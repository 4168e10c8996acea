"""mdlm.host_malloc: the glibc settings are applied when mdlm is imported, and can be declined."""

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

# Allocates, frees and re-touches a 64 MiB block 20 times; prints whether the settings were applied
# and the minor page faults the loop cost. With the settings, the freed block stays mapped, so the
# loop faults it in once; under glibc's defaults a block this size is a fresh mmap every time.
_PROBE = textwrap.dedent("""
    import ctypes, resource
    import mdlm
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      libc.free(p)
    print(mdlm.host_malloc.applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc.so.6" not in (ctypes.util.find_library("c") or ""),
    reason="mallopt settings exist on glibc only")


def _probe(setting):
  env = dict(os.environ, MDLM_HOST_MALLOC=setting)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1])


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
  applied, faults_tuned = _probe("tuned")
  declined, faults_default = _probe("default")
  assert applied and not declined
  pages = (64 << 20) // 4096
  # Tuned: the block is faulted in about once. glibc's defaults: about once per iteration.
  assert faults_tuned < 3 * pages, faults_tuned
  assert faults_default > 10 * pages, faults_default
