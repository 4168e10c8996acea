"""Tokenizers: sentencepiece (trained in-process or loaded), byte-level, character-level, and
GPT-2's byte-level BPE read from its files (the published MDLM / BD3-LM checkpoints' tokenizer).

All three share one contract. Ids 0..V-1 are real tokens, the specials BOS, EOS and PAD among
them; V = `vocab_size`. The diffusion mask id is V, which is no tokenizer id: `decode` drops it
(and any id >= V) together with the specials. Tokenizers pickle cheaply: the sentencepiece
processor (which cannot be pickled) is rebuilt lazily from the model bytes.

`save(dir)` writes `tokenizer.json` (+ `spm.model` for sentencepiece); `load_tokenizer(dir)` reads
it back. `fingerprint` is a hash of exactly what was saved, used to key token caches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm

from mdlm.config import DataConfig, TokenizerConfig
from mdlm.data import shard_format, sources

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "spm.model"


class Tokenizer:
  """Base class: subclasses define `vocab_size`, the special ids, `_encode`, `_decode` and
  `_state` (the JSON-able description that `save` writes)."""

  kind: str = ""
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset((self.bos_id, self.eos_id, self.pad_id))

  def encode(self, text: str) -> list[int]:
    return self._encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping BOS/EOS/PAD and ids outside [0, V) (e.g. the mask id V)."""
    specials = self.special_ids
    kept = [int(i) for i in np.asarray(ids).reshape(-1)
            if 0 <= int(i) < self.vocab_size and int(i) not in specials]
    return self._decode(kept)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, TOKENIZER_FILE),
                  json.dumps(self._state(), indent=1).encode())

  def char_lengths(self) -> np.ndarray:
    """Characters each id adds to the decoded text, int32 [V] (0 for BOS/EOS/PAD)."""
    raise NotImplementedError

  def count_chars(self, tokens_BxL, counted_BxL) -> np.ndarray:
    """Characters of the text of each row's counted tokens, int64 [B]: what bits per character
    divide by. A piece that opens a word with a space (sentencepiece's "\u2581") right after BOS
    adds no space: the document's text starts there."""
    tokens = np.asarray(tokens_BxL)
    counted = np.asarray(counted_BxL, bool) & (tokens >= 0) & (tokens < self.vocab_size)
    lengths = np.where(counted, self.char_lengths()[np.clip(tokens, 0, self.vocab_size - 1)], 0)
    leading = self._leading_space()
    if leading is not None:
      after_bos = np.zeros_like(counted)
      after_bos[:, 1:] = tokens[:, :-1] == self.bos_id
      opens = leading[np.clip(tokens, 0, self.vocab_size - 1)] & after_bos & counted
      lengths = lengths - opens
    return lengths.sum(axis=1).astype(np.int64)

  def _leading_space(self) -> Optional[np.ndarray]:
    return None

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(self._state(), sort_keys=True).encode()).hexdigest()[:16]

  def _state(self) -> dict:
    raise NotImplementedError

  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def __repr__(self):
    return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (V = 259). Lossless for any text."""

  kind = "byte"

  def __init__(self):
    self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
    self.vocab_size = 259

  def _encode(self, text):
    return list(text.encode("utf-8"))

  def _decode(self, ids):
    return bytes(ids).decode("utf-8", errors="replace")

  def char_lengths(self):
    # A UTF-8 character is one lead byte plus continuation bytes 0x80-0xBF: count the leads.
    lengths = np.zeros(self.vocab_size, np.int32)
    byte = np.arange(256)
    lengths[:256] = (byte < 0x80) | (byte >= 0xC0)
    return lengths

  def _state(self):
    return {"kind": self.kind}


class CharTokenizer(Tokenizer):
  """Character-level, as for text8: one id per character of a fixed alphabet (the training
  split's characters, sorted), then BOS, EOS, PAD and UNK (for characters outside it)."""

  kind = "char"

  def __init__(self, alphabet: str):
    if len(set(alphabet)) != len(alphabet) or not alphabet:
      raise ValueError("A character tokenizer needs a non-empty alphabet of distinct characters.")
    self.alphabet = alphabet
    self._index = {c: i for i, c in enumerate(alphabet)}
    n = len(alphabet)
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = n, n + 1, n + 2, n + 3
    self.vocab_size = n + 4

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
    chars: set[str] = set()
    for t in texts:
      chars.update(t)
    return cls("".join(sorted(chars)))

  def _encode(self, text):
    index, unk = self._index, self.unk_id
    return [index.get(c, unk) for c in text]

  def _decode(self, ids):
    return "".join("\ufffd" if i == self.unk_id else self.alphabet[i] for i in ids)

  def char_lengths(self):
    lengths = np.zeros(self.vocab_size, np.int32)
    lengths[: len(self.alphabet)] = 1
    lengths[self.unk_id] = 1
    return lengths

  def _state(self):
    return {"kind": self.kind, "alphabet": self.alphabet}

  def __getstate__(self):
    return {"alphabet": self.alphabet}

  def __setstate__(self, state):
    self.__init__(state["alphabet"])


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model. Its own pad/bos/eos pieces are used where it defines them; a
  special it lacks (e.g. a model trained elsewhere without pad) gets an id after its pieces."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    self.model_proto = bytes(model_proto)
    self._sp = None
    sp = self.processor
    size = sp.get_piece_size()
    extra = iter(range(size, size + 3))
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else next(extra)
    self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else next(extra)
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else next(extra)
    self.num_pieces = size
    self.vocab_size = max(size, self.bos_id + 1, self.eos_id + 1, self.pad_id + 1)

  @property
  def processor(self):
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    return self._sp

  def _encode(self, text):
    return self.processor.encode(text)

  def encode_batch(self, texts):
    return self.processor.encode(list(texts), num_threads=os.cpu_count() or 1)

  def _decode(self, ids):
    return self.processor.decode([i for i in ids if i < self.num_pieces])

  def char_lengths(self):
    if getattr(self, "_char_lengths", None) is None:
      sp, lengths = self.processor, np.zeros(self.vocab_size, np.int32)
      for i in range(self.num_pieces):
        if sp.is_control(i):
          continue
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # <0xNN>: a UTF-8 byte; count the lead bytes, as for ByteTokenizer
          byte = int(piece[3:5], 16)
          lengths[i] = int(byte < 0x80 or byte >= 0xC0)
        else:
          lengths[i] = len(piece.replace("\u2581", " "))
      self._char_lengths = lengths
    return self._char_lengths

  def _leading_space(self):
    """With a dummy prefix (models trained elsewhere; ours have none) the decoder drops the
    space the encoder put before a text's first word."""
    sp = self.processor
    if not sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581"):
      return None
    if getattr(self, "_leading", None) is None:
      self._leading = np.asarray([i < self.num_pieces and sp.id_to_piece(i).startswith("\u2581")
                                  for i in range(self.vocab_size)])
    return self._leading

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, SPM_FILE), self.model_proto)
    super().save(directory)

  def _state(self):
    return {"kind": self.kind, "model": SPM_FILE,
            "model_sha256": hashlib.sha256(self.model_proto).hexdigest()}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sp"] = None  # the processor cannot be pickled; rebuilt on first use
    return state


def _gpt2_byte_symbols() -> dict[str, int]:
  """GPT-2's byte-level alphabet, symbol -> byte: the printable bytes stand for themselves, the
  others (controls, space, ...) for the characters from U+0100 on, in byte order (Radford et
  al. 2019, "Language Models are Unsupervised Multitask Learners")."""
  printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  symbols, extra = {}, 0
  for b in range(256):
    if b in printable:
      symbols[chr(b)] = b
    else:
      symbols[chr(256 + extra)] = b
      extra += 1
  return symbols


class GPT2Tokenizer(Tokenizer):
  """GPT-2's byte-level BPE, read from its two files (vocab.json: piece -> id, merges.txt: the
  merge rules in order), run by the `tokenizers` package; no network. Ids are vocab.json's
  (GPT-2: V = 50257); BOS, EOS and PAD are all "<|endoftext|>" (50256), as MDLM wraps its
  documents with it and never pads. The mask id is V (50257), the row MDLM's DiT appends."""

  kind = "gpt2"
  END = "<|endoftext|>"
  FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))  # HF's, OpenAI's names

  def __init__(self, vocab_json: bytes, merges_txt: bytes):
    self.vocab_json, self.merges_txt = bytes(vocab_json), bytes(merges_txt)
    try:
      vocab = json.loads(self.vocab_json)
    except ValueError as e:
      raise ValueError(f"GPT-2 vocab.json is not JSON ({e}).") from None
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
      raise ValueError("GPT-2 vocab.json must map pieces to the ids 0..V-1, each once.")
    if self.END not in vocab:
      raise ValueError(f"GPT-2 vocab.json has no {self.END!r} piece: not GPT-2's format.")
    self.vocab_size = len(vocab)
    self.bos_id = self.eos_id = self.pad_id = int(vocab[self.END])
    self._pieces = sorted(vocab, key=vocab.get)
    self._tok = None
    self._char_lengths = None

  @classmethod
  def from_directory(cls, directory: str) -> "GPT2Tokenizer":
    directory = os.path.expanduser(directory)
    for vocab_name, merges_name in cls.FILES:
      vocab_path, merges_path = (os.path.join(directory, n) for n in (vocab_name, merges_name))
      if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        with open(vocab_path, "rb") as fv, open(merges_path, "rb") as fm:
          return cls(fv.read(), fm.read())
    names = " or ".join(" + ".join(pair) for pair in cls.FILES)
    raise ValueError(f"tokenizer.model_path={directory!r} holds no GPT-2 tokenizer files "
                     f"({names}); point it at a directory with them.")

  @property
  def processor(self):
    if self._tok is None:
      try:
        import tokenizers as hf
      except ImportError:
        raise ImportError("tokenizer.kind=gpt2 needs the `tokenizers` package: pip install "
                          "'mdlm[convert]' (or pip install tokenizers).") from None
      merges = [tuple(line.split(" ")) for line in self.merges_txt.decode().splitlines()
                if line and not line.startswith("#version")]
      vocab = {p: i for i, p in enumerate(self._pieces)}
      tok = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=merges))
      tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = hf.decoders.ByteLevel()
      tok.add_special_tokens([self.END])
      self._tok = tok
    return self._tok

  def _encode(self, text):
    return self.processor.encode(text).ids

  def encode_batch(self, texts):
    return [e.ids for e in self.processor.encode_batch(list(texts))]

  def _decode(self, ids):
    return self.processor.decode(ids, skip_special_tokens=False)

  def char_lengths(self):
    if self._char_lengths is None:
      byte_of = _gpt2_byte_symbols()
      lengths = np.zeros(self.vocab_size, np.int32)
      for i, piece in enumerate(self._pieces):
        if i in self.special_ids or any(c not in byte_of for c in piece):
          continue
        lengths[i] = sum(1 for c in piece if byte_of[c] < 0x80 or byte_of[c] >= 0xC0)
      self._char_lengths = lengths
    return self._char_lengths

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, "vocab.json"), self.vocab_json)
    _atomic_write(os.path.join(directory, "merges.txt"), self.merges_txt)
    super().save(directory)

  def _state(self):
    return {"kind": self.kind, "vocab": "vocab.json", "merges": "merges.txt",
            "vocab_sha256": hashlib.sha256(self.vocab_json).hexdigest(),
            "merges_sha256": hashlib.sha256(self.merges_txt).hexdigest()}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = None  # rebuilt on first use
    return state


def _atomic_write(path: str, data: bytes) -> None:
  """Write-then-rename, so that concurrent readers (other processes) never see half a file."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads a tokenizer written by `Tokenizer.save`."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"No tokenizer at {directory} ({TOKENIZER_FILE} is missing); point at the "
                     "`tokenizer/` directory of a run or of prepared shards.")
  with open(path) as f:
    state = json.load(f)
  kind = state.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer(state["alphabet"])
  if kind == "sentencepiece":
    with open(os.path.join(directory, state["model"]), "rb") as f:
      return SentencePieceTokenizer(f.read())
  if kind == "gpt2":
    with open(os.path.join(directory, state["vocab"]), "rb") as fv, \
        open(os.path.join(directory, state["merges"]), "rb") as fm:
      return GPT2Tokenizer(fv.read(), fm.read())
  raise ValueError(f"{path}: unknown tokenizer kind {kind!r}")


def load_sentencepiece_model(path: str) -> SentencePieceTokenizer:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer.model_path={path!r} does not exist; set it to a sentencepiece "
                     ".model file, or unset it to train one on the corpus.")
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return SentencePieceTokenizer(proto)
  except RuntimeError as e:
    raise ValueError(f"tokenizer.model_path={path!r} is not a sentencepiece model ({e}).") from None


# ----------------------------------------------------------------------------------------------
# Training a sentencepiece model in-process.

_MAX_PIECE_CHARS = 4000  # sentencepiece skips "sentences" above max_sentence_length (bytes)


def _training_sentences(texts: Iterable[str], max_chars: int):
  """Lines of the texts (newlines are a user-defined piece, so lines suffice), long lines cut
  into chunks, until `max_chars` characters have been given."""
  given = 0
  for text in texts:
    for line in text.split("\n"):
      for start in range(0, len(line), _MAX_PIECE_CHARS):
        chunk = line[start:start + _MAX_PIECE_CHARS]
        if not chunk.strip():
          continue
        yield chunk
        given += len(chunk)
        if given >= max_chars:
          return


def train_sentencepiece(texts: Iterable[str], cfg: TokenizerConfig) -> SentencePieceTokenizer:
  """Trains a BPE or unigram model on `texts` in memory.

  The model is lossless on its corpus: identity normalisation, whitespace kept as it is, and
  "\\n" a piece of its own, so decode(encode(text)) == text. With vocab_size >= 512, characters
  never seen in training fall back to UTF-8 byte pieces; below that, to <unk>.
  pad=0, unk=1, bos=2, eos=3; V = cfg.vocab_size exactly.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts, cfg.train_max_chars), model_writer=model,
        vocab_size=cfg.vocab_size, model_type=cfg.model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
        byte_fallback=cfg.vocab_size >= 512, character_coverage=1.0, split_digits=True,
        max_sentence_length=4 * _MAX_PIECE_CHARS + 16, num_threads=os.cpu_count() or 1,
        minloglevel=2)
  except RuntimeError as e:
    msg = str(e)
    if "smaller than required_chars" in msg:
      fix = "raise tokenizer.vocab_size: it must hold every character of the corpus"
    elif "too high" in msg:
      fix = "the corpus is too small for this vocabulary: lower tokenizer.vocab_size"
    else:
      fix = "check tokenizer.vocab_size against the corpus"
    raise ValueError(f"Training a sentencepiece model with tokenizer.vocab_size="
                     f"{cfg.vocab_size} failed: {fix} (or use tokenizer.kind=byte or char). "
                     f"sentencepiece said: {msg.strip()}") from None
  return SentencePieceTokenizer(model.getvalue())


# ----------------------------------------------------------------------------------------------
# Building the configured tokenizer (with an on-disk cache).

def _cache_key(tok_cfg: TokenizerConfig, data_cfg: DataConfig) -> str:
  ident = {"corpus": sources.corpus_identity(data_cfg), "split_seed": data_cfg.split_seed,
           "val_fraction": data_cfg.val_fraction, "kind": tok_cfg.kind}
  if tok_cfg.kind == "sentencepiece":
    ident.update(vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type,
                 train_max_chars=tok_cfg.train_max_chars)
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer(tok_cfg: TokenizerConfig, data_cfg: DataConfig,
                    cache_dir: Optional[str] = None) -> Tokenizer:
  """The tokenizer the configs describe.

  - byte: fixed. sentencepiece with `model_path`: loaded from that file.
  - sentencepiece without it / char: fitted to the *training split* of the configured corpus,
    saved under `<cache_dir>/tokenizer-<key>/` and reused when the corpus and settings match.
  - data.source=arrayrecord: the tokenizer saved with the shards (`<data.path>/tokenizer`).
  cache_dir None falls back to data_cfg.cache_dir; with neither, nothing is cached.
  """
  if data_cfg.source == "arrayrecord":
    return load_tokenizer(shard_format.tokenizer_dir(data_cfg.path))
  if tok_cfg.kind == "byte":
    return ByteTokenizer()
  if tok_cfg.kind == "sentencepiece" and tok_cfg.model_path:
    return load_sentencepiece_model(tok_cfg.model_path)
  if tok_cfg.kind == "gpt2":
    if not tok_cfg.model_path:
      raise ValueError("tokenizer.kind=gpt2 reads GPT-2's files: set tokenizer.model_path to a "
                       "directory with vocab.json and merges.txt (or encoder.json and vocab.bpe).")
    return GPT2Tokenizer.from_directory(tok_cfg.model_path)
  if tok_cfg.kind not in ("sentencepiece", "char"):
    raise ValueError(f"tokenizer.kind={tok_cfg.kind!r}; choose sentencepiece, byte, char or gpt2")
  cache_dir = cache_dir or data_cfg.cache_dir
  directory = None
  if cache_dir:
    directory = os.path.join(cache_dir, f"tokenizer-{_cache_key(tok_cfg, data_cfg)}")
    if os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
      return load_tokenizer(directory)
  train_docs = sources.split_documents(sources.read_documents(data_cfg), data_cfg, "train")
  if tok_cfg.kind == "char":
    tok: Tokenizer = CharTokenizer.from_texts(train_docs)
  else:
    tok = train_sentencepiece(train_docs, tok_cfg)
  if directory:
    tok.save(directory)
  return tok
