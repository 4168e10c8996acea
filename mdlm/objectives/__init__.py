"""Training objectives, one module each, looked up by name (see mdlm.objectives.base).

  diffusion  the masked-LM family; MDLM's NELBO by default (mdlm.objectives.diffusion)
  ar         exact next-token NLL (mdlm.objectives.ar)
  meap       next-token NLL from partly masked inputs (mdlm.objectives.meap)
  maria      the MARIA head over two frozen backbones (mdlm.objectives.maria)
  exlm       ExLM's expanded [MASK] states and their DAG loss (mdlm.objectives.exlm)
  bd3lm      block diffusion, BD3-LM (mdlm.objectives.block)
"""

from mdlm.objectives.base import (Objective, Setup, build, get, make_setup, names, register,
                                  run_objectives, settings_for)
from mdlm.objectives import ar, block, diffusion, exlm, maria, meap  # noqa: F401  (registers them)

__all__ = ["Objective", "Setup", "build", "get", "make_setup", "names", "register",
           "run_objectives", "settings_for"]
