"""What every command-line entry point shares: logging set up once, without start-up noise."""

from __future__ import annotations

import logging

# JAX logs one line per accelerator backend it probes and cannot open (for example "Unable to
# initialize backend 'tpu'" on a CPU machine) at INFO: expected, not news to the user.
_QUIET_LOGGERS = ("jax._src.xla_bridge",)


def setup_logging(level: int = logging.INFO) -> None:
  """INFO-level logging for mdlm's own messages; JAX's backend probing and absl's (orbax's)
  chatter are kept to warnings."""
  logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    import absl.logging
    absl.logging.set_verbosity(absl.logging.WARNING)
  except ImportError:  # absl comes with jax; nothing to quiet without it
    pass
