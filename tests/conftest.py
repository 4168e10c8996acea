"""Test setup: CPU only, deterministic, small thread pools (the suite targets a 2-core CPU)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
