"""What every command-line entry point shares: logging set up once, without start-up noise."""

from __future__ import annotations

import logging
import os

import absl.logging
from omegaconf import OmegaConf

# JAX logs one line per accelerator backend it probes and cannot open (for example "Unable to
# initialize backend 'tpu'" on a CPU machine) at INFO: expected, not news to the user.
_QUIET_LOGGERS = ("jax._src.xla_bridge",)


def setup_logging(level: int = logging.INFO) -> None:
  """INFO-level logging for mdlm's own messages; JAX's backend probing and absl's (orbax's)
  chatter are kept to warnings."""
  logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  absl.logging.set_verbosity(absl.logging.WARNING)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The config groups each Hydra application composes (its --help lists these and no others).
APP_GROUPS = {
    "train": ("model", "data", "tokenizer", "noise", "objective", "optim", "mesh", "experiment"),
    "sample": ("sampler", "mesh"),
    "evaluate": (),
    "aot": ("model", "data", "tokenizer", "noise", "objective", "optim", "mesh", "experiment"),
}


def group_options(groups) -> str:
  """`group: option, option, ...` lines for the given config groups (from configs/)."""
  lines = []
  for group in groups:
    names = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, group))
                   if f.endswith(".yaml"))
    lines.append(f"{group}: {', '.join(names)}")
  return "\n".join(lines) if lines else "(none: set keys directly, key=value)"


def register_help_resolver() -> None:
  """${mdlm_groups:<app>} in a help template: the option lists of that application's groups."""
  if not OmegaConf.has_resolver("mdlm_groups"):
    OmegaConf.register_new_resolver("mdlm_groups", lambda app: group_options(APP_GROUPS[app]))
