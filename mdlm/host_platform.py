"""Which JAX platforms a host without a TPU should start, settled once when mdlm is imported.

The test extra installs libtpu (mdlm.aot compiles for TPU topologies without a TPU). On a machine
with libtpu but no TPU chip, JAX still starts the TPU runtime, which prints several lines of
warnings about missing TPU metadata on every command before falling back to the CPU. When that is
the only outcome (no TPU device files or Google PCI device, no other PJRT plugin such as CUDA or
ROCm, and JAX_PLATFORMS unset), JAX_PLATFORMS=cpu gives the same devices without the noise. Anything else is left to JAX.
Set JAX_PLATFORMS yourself to override.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

# Device files of TPU chips (v4 and later: /dev/accel*; v2/v3 and VFIO setups: /dev/vfio/<n>).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
# PCI vendor id of Google's TPU chips, as the kernel lists them (what JAX itself looks for).
GOOGLE_PCI_VENDOR = "0x1ae0"
# Packages of accelerator plugins that JAX starts besides libtpu.
OTHER_PLUGIN_PREFIXES = ("jax_cuda", "jax_rocm", "jax_metal", "jax_plugins")


def has_tpu_devices() -> bool:
  if any(glob.glob(pattern) for pattern in TPU_DEVICE_GLOBS):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def has_other_plugins() -> bool:
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  names = {d.metadata["Name"].lower().replace("-", "_")
           for d in importlib.metadata.distributions() if d.metadata["Name"]}
  return any(n.startswith(OTHER_PLUGIN_PREFIXES) for n in names)


def settle() -> bool:
  """Sets JAX_PLATFORMS=cpu when JAX could only end up on the CPU after a noisy TPU start; True
  when it did. Call before jax starts a backend."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return False
  if has_tpu_devices() or has_other_plugins():
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  return True
