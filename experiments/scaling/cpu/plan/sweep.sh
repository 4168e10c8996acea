#!/usr/bin/env bash
# IsoFLOP sweep 'cpu': 30 jobs. Run from the repository root.
# Preferred locally: python -m mdlm.scaling launch experiments/scaling/cpu/plan
# (sequential, skips finished runs). The same jobs as a Hydra multirun:
# SLURM (not installed here): pip install hydra-submitit-launcher, then append e.g.
#   hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> \
#   hydra.launcher.timeout_min=240 hydra.launcher.gpus_per_node=1 hydra.launcher.tasks_per_node=1 \
#   hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=64 hydra.launcher.array_parallelism=16
# to the multirun command. Every job writes to its own run_dir with train.resume=auto, so
# resubmitting the same command after a preemption resumes the unfinished jobs.
set -euo pipefail

python -m mdlm.train -m \
  'hydra.searchpath=[file://experiments/scaling/cpu/plan/hydra]' \
  +scaling_job=mdlm-C1.2e11-L1-d16-s0,mdlm-C1.2e11-L1-d32-s0,mdlm-C1.2e11-L2-d32-s0,mdlm-C1.2e11-L2-d48-s0,mdlm-C1.2e11-L2-d64-s0,mdlm-C3.6e11-L1-d16-s0,mdlm-C3.6e11-L1-d32-s0,mdlm-C3.6e11-L2-d32-s0,mdlm-C3.6e11-L2-d48-s0,mdlm-C3.6e11-L2-d64-s0,mdlm-C1.08e12-L1-d32-s0,mdlm-C1.08e12-L2-d32-s0,mdlm-C1.08e12-L2-d48-s0,mdlm-C1.08e12-L2-d64-s0,mdlm-C1.08e12-L3-d80-s0 \
  hydra.sweep.dir=runs/scaling/cpu/hydra/mdlm \
  'hydra.sweep.subdir=${hydra.job.num}' \
  tokenizer=char \
  data.cache_dir=runs/scaling/cpu/data_cache \
  optim.b2=0.95 \
  optim.weight_decay=0.1 \
  optim.ema=0.0 \
  train.eval_batches=96 \
  train.progress=false \
  "$@"

python -m mdlm.train -m \
  'hydra.searchpath=[file://experiments/scaling/cpu/plan/hydra]' \
  +scaling_job=ar-C1.2e11-L1-d16-s0,ar-C1.2e11-L1-d32-s0,ar-C1.2e11-L2-d32-s0,ar-C1.2e11-L2-d48-s0,ar-C1.2e11-L2-d64-s0,ar-C3.6e11-L1-d16-s0,ar-C3.6e11-L1-d32-s0,ar-C3.6e11-L2-d32-s0,ar-C3.6e11-L2-d48-s0,ar-C3.6e11-L2-d64-s0,ar-C1.08e12-L1-d32-s0,ar-C1.08e12-L2-d32-s0,ar-C1.08e12-L2-d48-s0,ar-C1.08e12-L2-d64-s0,ar-C1.08e12-L3-d80-s0 \
  hydra.sweep.dir=runs/scaling/cpu/hydra/ar \
  'hydra.sweep.subdir=${hydra.job.num}' \
  tokenizer=char \
  data.cache_dir=runs/scaling/cpu/data_cache \
  optim.b2=0.95 \
  optim.weight_decay=0.1 \
  optim.ema=0.0 \
  train.eval_batches=96 \
  train.progress=false \
  "$@"
