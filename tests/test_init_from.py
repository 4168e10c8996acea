"""Fine-tuning from an existing run (train.init_from): weights, tokenizer, refusals, resume, SFT."""

import hashlib
import json
import os
import shutil
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from mdlm import checkpointing, finetune, train
from mdlm import rundir
from mdlm import config as config_lib
from mdlm import data as data_lib
from tests.helpers import (REPO, StopAfter, read_metrics, run_python, tiny_config,
                           train_losses)


def _weights(run_dir, ema, step=None):
  model = rundir.load_run(run_dir, ema=ema, step=step).model
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)  # bit for bit


def _tree_digest(root):
  """{relative path: sha256} of every file under root: a run must come out of a fine-tune as is."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _finetune_config(source, **train_kw):
  """One step whose learning rate is 0 (warmup starts at 0; weight_decay is 0): the parameters,
  and an EMA that starts at them, come out of step 1 exactly as they went in."""
  cfg = tiny_config(steps=1, eval_every=1000, init_from=source, **train_kw)
  cfg.optim.warmup_steps, cfg.optim.ema = 2, 0.9
  return cfg


@pytest.fixture(scope="module")
def char_source(tmp_path_factory):
  """A source whose EMA differs from its raw weights, with checkpoints at steps 2 and 3 and a
  char tokenizer (fitted to its corpus, so a retrained one on other data would differ)."""
  run_dir = str(tmp_path_factory.mktemp("char_source") / "run")
  cfg = tiny_config(steps=3, checkpoint_every=2, eval_every=1000)
  cfg.tokenizer = config_lib.TokenizerConfig(kind="char")
  cfg.optim.ema = 0.5
  train.run(cfg, run_dir)
  return run_dir


def _char_cfg(cfg):
  cfg.tokenizer = config_lib.TokenizerConfig(kind="char")
  return cfg


def test_starts_from_the_source_weights_ema_or_raw(tmp_path, char_source):
  before = _tree_digest(char_source)
  src_ema, src_raw = _weights(char_source, ema=True), _weights(char_source, ema=False)
  assert any(not np.array_equal(x, y) for x, y in zip(src_ema, src_raw))  # a meaningful test

  # The latest checkpoint's EMA (the default).
  a = str(tmp_path / "ema")
  train.run(_char_cfg(_finetune_config(char_source)), a)
  _assert_same(_weights(a, ema=False), src_ema)
  _assert_same(_weights(a, ema=True), src_ema)  # the fresh EMA starts at the loaded weights
  metrics = read_metrics(a)
  assert [m["step"] for m in metrics if "train/loss" in m] == [1]  # the step counter restarts
  assert metrics[0]["train/lr"] == 0.0  # ... and so does the schedule (a fresh optimizer)
  assert finetune.read_provenance(a) == {
      "init_from": char_source, "run_dir": char_source, "step": 3, "weights": "ema",
      "objective": "diffusion", "model_kind": "denoiser",
      "tokenizer_fingerprint": data_lib.load_tokenizer(f"{char_source}/tokenizer").fingerprint}
  assert rundir.load_config(a).train.init_from == char_source  # in config.yaml

  # Raw weights of an older checkpoint, named by its step directory.
  b = str(tmp_path / "raw")
  train.run(_char_cfg(_finetune_config(f"{char_source}/checkpoints/2", init_from_ema=False)), b)
  _assert_same(_weights(b, ema=False), _weights(char_source, ema=False, step=2))
  assert finetune.read_provenance(b)["step"] == 2
  assert _tree_digest(char_source) == before  # the source was only read


def test_tokenizer_is_copied_not_retrained(tmp_path, char_source, monkeypatch):
  # Other data, whose characters differ from the source corpus: a retrained char tokenizer
  # would differ from the source's.
  corpus = tmp_path / "other.txt"
  corpus.write_text("".join(f"ÀÉÎ õü {i} zzz qqq\n" for i in range(300)), encoding="utf-8")
  cfg = _char_cfg(_finetune_config(char_source))
  cfg.data = config_lib.DataConfig(source="text", path=str(corpus), seq_len=32, val_fraction=0.2)
  retrained = data_lib.build_tokenizer(cfg.tokenizer, cfg.data)
  src_tok = data_lib.load_tokenizer(f"{char_source}/tokenizer")
  assert retrained.fingerprint != src_tok.fingerprint

  def no_training(*a, **k):
    raise AssertionError("the tokenizer was built instead of copied from the source")

  monkeypatch.setattr(data_lib, "build_tokenizer", no_training)
  run_dir = str(tmp_path / "run")
  train.run(cfg, run_dir)
  assert _tree_digest(f"{run_dir}/tokenizer") == _tree_digest(f"{char_source}/tokenizer")
  assert rundir.load_run(run_dir).tokenizer.fingerprint == src_tok.fingerprint


def _refused(cfg, run_dir, monkeypatch, *parts, error=ValueError):
  """The run is refused before anything compiles, with a message holding `parts`; nothing of it
  is written beyond its (empty) directory."""
  def compiled(*a, **k):
    raise AssertionError("refused too late: the train state was being compiled")

  monkeypatch.setattr(train, "init_state", compiled)
  with pytest.raises(error) as err:
    train.run(cfg, run_dir)
  for part in parts:
    assert part in str(err.value), (part, str(err.value))
  assert not os.path.exists(run_dir) or not os.listdir(run_dir), os.listdir(run_dir)
  return str(err.value)


def test_bad_sources_are_refused_before_compiling(tmp_path, tiny_run, monkeypatch):
  before = _tree_digest(tiny_run)
  out = str(tmp_path / "new")
  missing = str(tmp_path / "no_such_run")
  _refused(tiny_config(init_from=missing), out, monkeypatch, f"train.init_from={missing}",
           "No run directory or checkpoint", "drop train.init_from")
  _refused(tiny_config(init_from=f"{tiny_run}/checkpoints/7"), out, monkeypatch,
           "checkpoints/7", "No run directory or checkpoint")
  _refused(tiny_config(init_from=tiny_run, init_from_step=7), out, monkeypatch,
           "has no step 7", "[30]", "train.init_from_step")

  # A run directory without checkpoints (e.g. one that never reached its first save).
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(f"{tiny_run}/config.yaml", untrained)
  shutil.copytree(f"{tiny_run}/tokenizer", untrained / "tokenizer")
  _refused(tiny_config(init_from=str(untrained)), out, monkeypatch, str(untrained),
           "no checkpoints/ directory", "Train the source run first")

  # An unreadable checkpoint: refused, and the copy is left as it was (no quarantine).
  broken = str(tmp_path / "broken")
  shutil.copytree(tiny_run, broken)
  for root, _, files in os.walk(f"{broken}/checkpoints/30/state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  broken_before = _tree_digest(broken)
  _refused(tiny_config(init_from=broken), out, monkeypatch, f"checkpoint step 30 of {broken}",
           "unreadable", "point train.init_from at another run")
  assert _tree_digest(broken) == broken_before

  # Architecture: every differing shape field named, with the values to set.
  cfg = tiny_config(init_from=tiny_run)
  cfg.model = cfg.model.replace(d_model=32, num_layers=3)
  _refused(cfg, out, monkeypatch, "model.num_layers=3 here, 2 in the source",
           "model.d_model=32 here, 64 in the source", "Set model.num_layers=2 model.d_model=64",
           "drop train.init_from")
  cfg = tiny_config(init_from=tiny_run)
  cfg.model = cfg.model.replace(mlp="swiglu")
  _refused(cfg, out, monkeypatch, "model.mlp=swiglu here, gelu in the source",
           "Set model.mlp=gelu (")
  cfg = tiny_config(init_from=tiny_run)
  cfg.model = cfg.model.replace(d_ff=128)
  _refused(cfg, out, monkeypatch, "model.d_ff=128 here, 0 in the source", "Set model.d_ff=0")

  # Tokenizer: the source's (byte) is reused, so asking for another one is refused.
  cfg = tiny_config(init_from=tiny_run)
  cfg.tokenizer = config_lib.TokenizerConfig(kind="sentencepiece", vocab_size=512)
  _refused(cfg, out, monkeypatch, "tokenizer.kind=sentencepiece here, byte in the source",
           "Set tokenizer.kind=byte")
  assert _tree_digest(tiny_run) == before


def test_shape_diffs():
  from mdlm.models import presets
  m = presets.get("tiny", vocab_size=259)
  assert finetune.shape_diffs(m.replace(d_ff=256), m) == []  # the default width, spelled out
  assert finetune.shape_diffs(m.replace(dropout=0.1, dtype="bfloat16", kind="ar"), m) == []
  assert finetune.shape_diffs(m.replace(d_model=128), m) == [("d_model", 128, 64)]
  assert finetune.shape_diffs(m.replace(num_kv_heads=4), m) == []  # num_heads, spelled out
  assert finetune.shape_diffs(m.replace(num_kv_heads=2), m) == [("num_kv_heads", 2, 0)]
  assert finetune.shape_diffs(m.replace(scan_layers=True), m) == [("scan_layers", True, False)]
  assert finetune.shape_diffs(m.replace(max_seq_len=256, vocab_size=260), m) == [
      ("vocab_size", 260, 259)]  # no parameter depends on the length (rotary positions)
  tc = m.replace(time_conditioning=True)
  assert finetune.shape_diffs(tc.replace(cond_dim=64), tc) == [("cond_dim", 64, 128)]


def test_kind_change_is_allowed_with_a_warning(caplog):
  """Same shapes, another function (AR -> diffusion adaptation): allowed, and said so."""
  from mdlm.models import presets
  ar = presets.get("tiny", kind="ar", vocab_size=259)
  source = finetune.Source("runs/ar", "/runs/ar", 30, True, None, data_lib.ByteTokenizer(), ar)
  with caplog.at_level("WARNING", logger="mdlm.finetune"):
    finetune.check_model(ar.replace(kind="denoiser"), source)
  assert any("model.kind=denoiser here, ar in the source" in r.getMessage()
             for r in caplog.records)


def test_context_extension_starts_from_the_source_weights(tmp_path, tiny_run, caplog,
                                                         monkeypatch):
  """A longer model.max_seq_len than the source's, trained at a data.seq_len the source never
  saw: allowed with a warning, the starting weights are the source's, bit for bit, and the
  training batches have the new length."""
  src = rundir.load_config(tiny_run)
  cfg = _finetune_config(tiny_run)
  cfg.model = cfg.model.replace(max_seq_len=2 * src.model.max_seq_len)
  cfg.data.seq_len = src.model.max_seq_len + 32
  run_dir = str(tmp_path / "long")
  shapes, make_step = [], train.make_train_step

  def spy(*a, **k):
    step = make_step(*a, **k)

    def recorded(state, batch):
      shapes.append(batch["tokens"].shape)
      return step(state, batch)
    return recorded

  monkeypatch.setattr(train, "make_train_step", spy)
  with caplog.at_level("WARNING", logger="mdlm.finetune"):
    train.run(cfg, run_dir)
  assert shapes == [(cfg.train.batch_size, cfg.data.seq_len)]
  assert any(f"model.max_seq_len={2 * src.model.max_seq_len} here, {src.model.max_seq_len} in "
             "the source" in r.getMessage() for r in caplog.records)
  _assert_same(_weights(run_dir, ema=False), _weights(tiny_run, ema=True))
  loaded = rundir.load_run(run_dir)
  assert loaded.config.model.max_seq_len == 2 * src.model.max_seq_len
  tokens = jax.numpy.zeros((1, cfg.data.seq_len), jax.numpy.int32)
  assert loaded.model(tokens).shape == (1, cfg.data.seq_len, loaded.model.cfg.vocab_size)


def test_init_from_config_validation():
  with pytest.raises(ValueError, match="objective=maria"):
    config_lib.validate(tiny_config(init_from="runs/x", objective="maria"))
  with pytest.raises(ValueError, match="init_from_step=3 needs train.init_from"):
    config_lib.validate(tiny_config(init_from_step=3))
  with pytest.raises(ValueError, match="train.init_from is empty"):
    config_lib.validate(tiny_config(init_from=""))
  # Hydra: the documented command line composes and validates.
  from hydra import compose, initialize_config_dir
  config_lib.register_configs()
  with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
    cfg = config_lib.to_config(compose("config", overrides=[
        "experiment=meap_sft", "data.path=sft.jsonl", "train.init_from=runs/ar_pretrained",
        "train.init_from_ema=false", "train.init_from_step=1000"]))
  assert (cfg.train.init_from, cfg.train.init_from_ema, cfg.train.init_from_step) == (
      "runs/ar_pretrained", False, 1000)
  assert cfg.data.meap_sft and cfg.model.kind == "ar"


def test_interrupted_finetune_resumes_from_its_own_checkpoint(tmp_path, tiny_run, monkeypatch,
                                                              caplog):
  """init_from is read at the first start only; a restart resumes the run's own checkpoint (that
  resume is bit-exact: test_train.py::test_exact_resume_is_bit_identical, the same code path)."""
  kw = dict(steps=4, checkpoint_every=2, eval_every=1000)
  source = str(tmp_path / "source")  # a copy, removed once the fine-tune has started
  shutil.copytree(tiny_run, source)
  run_dir = str(tmp_path / "run")
  monkeypatch.setattr(train, "_StopFlag", lambda: StopAfter(3))
  train.run(tiny_config(init_from=source, **kw), run_dir)
  assert json.load(open(f"{run_dir}/status.json"))["step"] == 3
  monkeypatch.undo()
  first = train_losses(run_dir)
  shutil.rmtree(source)  # a restart that read init_from again would fail
  with caplog.at_level("INFO", logger="mdlm.train"):
    train.run(tiny_config(init_from=source, **kw), run_dir)
  assert any("is ignored" in r.getMessage() and "resuming" in r.getMessage()
             for r in caplog.records)
  losses = train_losses(run_dir)
  assert sorted(losses) == [1, 2, 3, 4] and all(losses[s] == first[s] for s in first)
  lrs = {m["step"]: m["train/lr"] for m in read_metrics(run_dir) if "train/lr" in m}
  # Step 4 ran with the schedule past warmup: the step counter continued (a fresh start from
  # the source would log lr 0 at its first step again).
  assert lrs[1] == 0.0 and lrs[4] == pytest.approx(3e-3)
  assert json.load(open(f"{run_dir}/status.json"))["state"] == "finished"
  assert finetune.read_provenance(run_dir)["run_dir"] == source  # written once, at the start


def test_meap_sft_finetune_from_an_ar_run(tmp_path, tiny_ar_run):
  from tests.test_meap_sft import _cfg, _records, _write
  cfg = tiny_config(steps=4, eval_every=4, objective="ar", init_from=tiny_ar_run)
  cfg.model = cfg.model.replace(kind="ar")
  # A longer window than the source was trained on (32): fine up to model.max_seq_len.
  cfg.data = _cfg(_write(tmp_path / "sft.jsonl", _records()), seq_len=48)
  run_dir = str(tmp_path / "sft")
  train.run(cfg, run_dir)
  losses = list(train_losses(run_dir).values())
  evals = [m["val/nll"] for m in read_metrics(run_dir) if "val/nll" in m]
  assert len(losses) == 4 and np.all(np.isfinite(losses)) and np.isfinite(evals[-1])
  assert json.load(open(f"{run_dir}/status.json"))["state"] == "finished"
  assert finetune.read_provenance(run_dir)["objective"] == "ar"
  saved = rundir.load_config(run_dir)
  assert saved.data.meap_sft and saved.train.init_from == tiny_ar_run


def test_sharded_finetune_places_the_source_weights(tmp_path, tiny_run):
  """On a (data=2, fsdp=2) mesh of 4 CPU devices the weights load into the run's shardings."""
  script = textwrap.dedent("""
      import sys, jax, numpy as np
      from flax import nnx
      from mdlm import rundir, train
      from tests.helpers import tiny_config
      src, out = sys.argv[1], sys.argv[2]
      cfg = tiny_config(steps=1, eval_every=1000, init_from=src)
      cfg.optim.warmup_steps = 2  # lr 0 at step 0: the weights come out as they went in
      cfg.mesh.data, cfg.mesh.fsdp = 2, 2
      train.run(cfg, out)
      leaves = lambda run: jax.tree.leaves(nnx.to_pure_dict(nnx.state(
          rundir.load_run(run, ema=False).model)))
      for x, y in zip(leaves(out), leaves(src)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      print("devices", jax.device_count())
  """)
  proc = run_python(["-c", script, tiny_run, str(tmp_path / "run")],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "devices 4" in proc.stdout
