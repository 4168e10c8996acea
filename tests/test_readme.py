"""Every command in the README's bash blocks runs as written: extracted from README.md, with tiny
settings appended (and the README's placeholder paths pointed at small files and runs made here).

Train, evaluate, sample, prepare and scaling commands run in this process through the same
Hydra composition (or argument parser) as their CLIs; multirun and the benchmark scripts run as
subprocesses. Commands that need what CI does not have (the Hugging Face datasets and network,
eight devices, the SLURM launcher) are composed and validated, not run; each such case is listed
in NOT_RUN with the reason.
"""

import json
import os
import re
import shlex
import shutil
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mdlm import config as config_lib
from mdlm import aot, convert, evaluate, sample, train
from mdlm import joints
from mdlm.data import prepare
from mdlm.sampling import config as sample_config
from mdlm.scaling import __main__ as scaling_cli
from tests import test_convert
from tests.helpers import REPO, run_python

CONFIGS = os.path.join(REPO, "configs")
# Appended to every training command: a one-layer model, a small corpus, two steps.
TINY_TRAIN = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
              "data.seq_len=32", "data.max_documents=12", "data.val_fraction=0.2",
              "tokenizer.vocab_size=100", "train.steps=2", "train.eval_every=2",
              "train.eval_batches=1", "train.checkpoint_every=2", "train.batch_size=4",
              "train.progress=false", "optim.warmup_steps=1"]
TINY_SAMPLE = ["num_samples=2", "batch_size=2", "sampler.steps=4", "print_samples=false",
               "progress=false"]
TINY_EVAL = ["batch_size=8", "progress=false"]
TINY_JOINTS = ["num_pairs=2", "batch_size=2"]
# Appended to every mdlm.aot command: the same target, mesh and batch, a one-layer model.
TINY_AOT = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=0",
            "model.d_ff=64", "model.vocab_size=100", "data.seq_len=32"]
BENCH_ARGS = {
    "bench_models.py": ["--presets", "tiny", "--repeats", "1", "--batch", "2", "--seq-len", "16",
                        "--vocab", "64"],
    "bench_train.py": ["--presets", "tiny", "--repeats", "1", "--warmup", "1", "--peak-repeats",
                       "1", "--seq-len", "16", "--batch", "2", "--vocab", "64"],
    "bench_sampling.py": ["--batches", "1", "--multipliers", "1", "--repeats", "1", "--length",
                          "16", "--vocab", "64"],
    "parity.py": ["--out", "{tmp}"],
}
# The sweep trains 30 models (about 65 minutes) and its parametric fit bootstraps for minutes:
# `launch` lists the jobs it would run, `fit` runs Approaches 1 and 2 without the bootstrap (the
# full fits: tests/test_scaling.py).
SCALING_ARGS = {"launch": ["--dry-run"], "fit": ["--bootstrap", "0", "--no-parametric"]}
# (substring of the command, why it is only composed and validated here)
NOT_RUN = [("experiment=mdlm_owt", "the OpenWebText recipe needs the datasets extra and network"),
           ("mesh.fsdp=4 mesh.tensor=2", "needs 8 devices")]
# (substring, why it is not even composed)
SKIPPED = [("hydra/launcher=submitit_slurm", "needs the [slurm] extra (hydra-submitit-launcher)"),
           ("python -m mdlm.train ...", "an illustration of the multi-host environment variables"),
           ("python -m pytest", "this test suite itself (CI runs it)")]


def readme_commands() -> list[str]:
  text = open(os.path.join(REPO, "README.md")).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", line).strip()
      if line and not line.startswith("#"):
        commands.extend(part.strip() for part in line.split("&&"))
  return [c for c in commands if not c.startswith("pip ")]


@pytest.fixture(scope="session")  # session: built once a worker, however xdist orders the tests
def world(tmp_path_factory):
  """The files and runs the README's placeholders stand for."""
  root = tmp_path_factory.mktemp("readme")
  lines = [f"Line {i}: a sentence of plain prose for the examples, number {i}." for i in range(600)]
  (root / "corpus.txt").write_text("\n".join(lines))
  (root / "other.txt").write_text("\n".join(reversed(lines)))
  (root / "books").mkdir()
  for name in ("a", "b", "c"):
    (root / "books" / f"{name}.txt").write_text("\n".join(lines[:200]))
  with open(root / "docs.jsonl", "w") as f:
    for line in lines:
      f.write(json.dumps({"content": line}) + "\n")
  with open(root / "sft.jsonl", "w") as f:
    for i in range(200):
      f.write(json.dumps({"prompt": f"Question {i}?", "response": lines[i] * 2}) + "\n")
  cache = str(root / "cache")
  runs = {}
  for name, extra in (("pretrained", []), ("ar_pretrained", ["model=ar"])):
    runs[name] = str(root / name)
    _train(extra + [f"data.cache_dir={cache}"], runs[name])
  runs["maria"] = str(root / "maria")
  _train(["experiment=maria", f"objective.denoiser_run={runs['pretrained']}",
          f"objective.ar_run={runs['ar_pretrained']}", f"data.cache_dir={cache}"], runs["maria"])
  # The committed CPU sweep, copied: the commands write into the copy, never into the repository.
  scaling = root / "scaling"
  shutil.copytree(os.path.join(REPO, "experiments", "scaling", "cpu"), scaling / "cpu")
  subst = {
      "runs/2026-11-27/10-00-00": runs["pretrained"], "<run dir>": runs["pretrained"],
      "<run>": runs["pretrained"], "<MARIA run>": runs["maria"],
      "runs/ar_pretrained": runs["ar_pretrained"], "runs/pretrained": runs["pretrained"],
      "/data/domain.txt": str(root / "corpus.txt"), "/data/my_corpus.txt": str(root / "corpus.txt"),
      "/data/big.txt": str(root / "corpus.txt"), "/data/books/*.txt": str(root / "books/*.txt"),
      "/data/docs.jsonl": str(root / "docs.jsonl"), "sft.jsonl": str(root / "sft.jsonl"),
      "other.txt": str(root / "other.txt"), "/data/shards": str(root / "shards"),
      "/models/spm.model": os.path.join(runs["pretrained"], "tokenizer", "spm.model"),
      "experiments/scaling/cpu/": str(scaling / "cpu") + "/",
      "tokenizer.vocab_size=32768": "tokenizer.vocab_size=100",
      "runs/bd3lm_b16": str(root / "bd3lm_b16"),
  }
  return {"root": root, "subst": subst, "cache": cache}


def _train(overrides, run_dir):
  train.run(_compose("config", overrides + TINY_TRAIN), run_dir, tuple(overrides))


def _compose(config_name, overrides):
  GlobalHydra.instance().clear()
  config_lib.register_configs()
  sample_config.register_configs()
  evaluate.register_configs()
  joints.register_configs()
  aot.register_configs()
  with initialize_config_dir(config_dir=CONFIGS, version_base=None):
    node = compose(config_name, overrides=overrides)
  obj = OmegaConf.to_object(node)
  if config_name != "config":
    return obj
  if obj.train.phases:  # a recipe's phase steps add up to its own train.steps, not to 2
    obj.train.phase_cycle = True
  return config_lib.validate(obj)


def _substitute(command, subst):
  for old in sorted(subst, key=len, reverse=True):
    command = command.replace(old, subst[old])
  return command


def _run(command, world, tmp_path):
  argv = shlex.split(_substitute(command, world["subst"]))
  if argv[:3] == ["python", "-m", "mdlm.train"]:
    overrides = argv[3:] + [f"data.cache_dir={world['cache']}"]
    if "-m" in overrides:  # a Hydra multirun: the CLI itself, in a subprocess
      proc = run_python(["-m", "mdlm.train"] + overrides + TINY_TRAIN +
                        [f"hydra.sweep.dir={tmp_path / 'multirun'}"], timeout=600)
      assert proc.returncode == 0, proc.stderr[-3000:]
      return
    for part, _ in NOT_RUN:
      if part in command:
        _compose("config", overrides + TINY_TRAIN)
        return
    run_dir = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    _train([o for o in overrides if not o.startswith("run_dir=")],
           run_dir[0] if run_dir else str(tmp_path / "run"))
  elif argv[:3] == ["python", "-m", "mdlm.convert"]:
    # A tiny random DiT in the published layout and a tiny GPT-2-format BPE stand in for the
    # downloaded snapshot and GPT-2's files (tests/test_convert.py checks parity with them).
    v = test_convert.write_bpe(tmp_path / "gpt2")
    test_convert.snapshot(tmp_path / "mdlm-owt", test_convert.random_state_dict(v + 1),
                          test_convert.hf_config(v + 1))
    subst = {"path/to/mdlm-owt": str(tmp_path / "mdlm-owt"), "path/to/gpt2": str(tmp_path / "gpt2"),
             "runs/mdlm_owt": str(tmp_path / "mdlm_owt")}
    assert convert.main(shlex.split(_substitute(" ".join(argv[3:]), subst))) == 0
    assert os.path.exists(os.path.join(str(tmp_path / "mdlm_owt"), "config.yaml"))
  elif argv[:3] == ["python", "-m", "mdlm.joints"]:
    record = joints.run_joints(_compose("joints", argv[3:] + TINY_JOINTS +
                                        [f"output={tmp_path / 'joints.json'}"]))
    assert all(k["figures"]["ag"]["p_ppl"] >= 1 for k in record["kinds"].values())
  elif argv[:3] == ["python", "-m", "mdlm.joints"]:
    proc = run_python(argv[1:] + ["num_pairs=2", "top_k=4", "kinds=[adjacent]",
                                  f"output={tmp_path / 'joints.json'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  elif argv[:3] == ["python", "-m", "mdlm.evaluate"]:
    result = evaluate.evaluate_run(_compose("evaluate", argv[3:] + TINY_EVAL))
    assert result["nll"] > 0
  elif argv[:3] == ["python", "-m", "mdlm.sample"]:
    overrides = sample.quote_text_overrides(argv[3:]) + TINY_SAMPLE
    cfg = _compose("sample", overrides + [f"output={tmp_path / 'samples.jsonl'}"])
    summary = sample.run(sample_config.validate(cfg))
    assert summary["num_samples"] == 2
  elif argv[:3] == ["python", "-m", "mdlm.aot"]:
    overrides = argv[3:] + TINY_AOT + [f"aot.output={tmp_path / 'aot.json'}"]
    report = aot.run(_compose("aot", overrides))
    assert report["memory_per_device"]["peak"] > 0 and report["fits"]
  elif argv[:3] == ["python", "-m", "mdlm.data.prepare"]:
    assert prepare.main(argv[3:] + ["--overwrite"]) == 0
  elif argv[:3] == ["python", "-m", "mdlm.scaling"]:
    args = argv[3:] + SCALING_ARGS.get(argv[3], [])
    if argv[3] == "fit":  # the committed results (collect has rewritten the copy's from its plan)
      for name in ("results.csv", "curves.csv"):
        shutil.copy(os.path.join(REPO, "experiments", "scaling", "cpu", name),
                    world["subst"]["experiments/scaling/cpu/"] + name)
    assert scaling_cli.main(args) in (0, None)
  elif argv[0] == "python" and argv[1].startswith("experiments/"):
    script = os.path.basename(argv[1])
    extra = [a.replace("{tmp}", str(tmp_path)) for a in BENCH_ARGS[script]]
    proc = run_python([argv[1]] + argv[2:] + extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  else:
    raise AssertionError(f"the README shows a command this test does not know how to run: "
                         f"{command!r}; teach tests/test_readme.py")


def test_the_readme_has_its_two_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  assert "pip install -e . && python -m mdlm.train" in text
  assert 'pip install -e ".[test]" && python -m pytest' in text
  assert 'python -m pip install -q -e ".[test]" && python -m pytest' in open(
      os.path.join(REPO, ".ci", "run")).read()


def command_groups(commands) -> list[list[tuple[int, str]]]:
  """The commands that are run, numbered, in groups that must run in order on one worker: a
  command that reads what an earlier one wrote (prepare -> train on its shards; the scaling
  plan -> launch -> collect -> fit -> plot) joins that command's group."""
  groups, chains = [], {}
  for i, command in enumerate(commands):
    if any(part in command for part, _ in SKIPPED):
      continue
    chain = ("shards" if "mdlm.data.prepare" in command or "data=arrayrecord" in command else
             "scaling" if command.startswith("python -m mdlm.scaling") else
             "bd3lm" if "runs/bd3lm_b16" in command else None)
    if chain in chains:
      chains[chain].append((i, command))
      continue
    groups.append([(i, command)])
    if chain:
      chains[chain] = groups[-1]
  return groups


COMMANDS = readme_commands()
GROUPS = command_groups(COMMANDS)


def test_the_readme_commands_are_all_covered():
  assert len(COMMANDS) >= 40, COMMANDS
  for part, why in SKIPPED:  # each skip names one command: a stale entry is noticed
    assert sum(part in c for c in COMMANDS) == 1, (part, why)
  assert sum(len(g) for g in GROUPS) == len(COMMANDS) - len(SKIPPED)


# Each group is its own pytest-xdist group, so the workers share the README's commands.
@pytest.mark.parametrize("group", [
    pytest.param(g, id=f"cmd{g[0][0]:02d}", marks=pytest.mark.xdist_group(f"readme{g[0][0]}"))
    for g in GROUPS])
def test_readme_command_runs(group, world, tmp_path):
  for i, command in group:
    work = tmp_path / f"c{i}"
    work.mkdir()
    start = time.perf_counter()
    try:
      _run(command, world, work)
    except Exception as e:
      raise AssertionError(f"README command {i} failed: {command}\n{type(e).__name__}: {e}") from e
    print(f"{time.perf_counter() - start:6.1f} s  {command}")   # shown with pytest -s
