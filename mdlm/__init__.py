"""mdlm: masked diffusion language models in JAX / Flax NNX."""

from mdlm import host_malloc, host_platform

__version__ = "0.1.0"

host_malloc.tune()  # before jax starts its CPU threads: see mdlm/host_malloc.py
host_platform.settle()  # before jax starts a backend: see mdlm/host_platform.py
