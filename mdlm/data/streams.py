"""Token streams: one split of a corpus as BOS doc_0 EOS BOS doc_1 EOS ..., with a disk cache.

A stream is what both layouts read: the wrap layout cuts windows from it, the pad layout takes
one document (BOS .. EOS) per row. `TokenStream` holds it in memory (memory-mapped from the
cache); `mdlm.data.shards.ShardStream` reads the same from pre-tokenized ArrayRecord shards.

The cache stores a split's tokens as `tokens-<key>.npy` (+ `.offsets.npy`, `.json`) where the key
hashes the corpus identity, the split settings, the split and the tokenizer's fingerprint, so a
second run with the same settings does not re-tokenize (or even read) the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Optional

import numpy as np

from mdlm.config import DataConfig
from mdlm.data import sources
from mdlm.data.tokenizers import Tokenizer

CACHE_VERSION = 1
_ENCODE_CHUNK = 1024  # documents per encode_batch call


@dataclasses.dataclass
class TokenStream:
  """tokens: int32 [T], the split's stream; offsets: int64 [D + 1], document k (with its BOS
  and EOS) is tokens[offsets[k]:offsets[k + 1]]; num_chars: characters of the D documents."""

  tokens: np.ndarray
  offsets: np.ndarray
  num_chars: int

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  def span(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self.tokens[start:stop], np.int32)

  def document(self, k: int) -> np.ndarray:
    return self.span(int(self.offsets[k]), int(self.offsets[k + 1]))


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> TokenStream:
  """Tokenizes documents into one stream, each wrapped as BOS + doc + EOS."""
  pieces, lengths = [], np.zeros(len(docs), np.int64)
  bos = np.array([tokenizer.bos_id], np.int32)
  eos = np.array([tokenizer.eos_id], np.int32)
  for start in range(0, len(docs), _ENCODE_CHUNK):
    for j, ids in enumerate(tokenizer.encode_batch(docs[start:start + _ENCODE_CHUNK])):
      pieces += [bos, np.asarray(ids, np.int32), eos]
      lengths[start + j] = len(ids) + 2
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  return TokenStream(tokens, offsets, sum(len(d) for d in docs))


def cache_key(data_cfg: DataConfig, tokenizer: Tokenizer, split: str) -> str:
  ident = {"corpus": sources.corpus_identity(data_cfg), "split": split,
           "split_seed": data_cfg.split_seed, "val_fraction": data_cfg.val_fraction,
           "tokenizer": tokenizer.fingerprint, "version": CACHE_VERSION}
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _save(stream: TokenStream, prefix: str) -> None:
  """Arrays first, the JSON last: the JSON's presence marks a complete entry. Each file is
  written under a temporary name and renamed, so concurrent processes never read half a file."""
  directory = os.path.dirname(prefix)
  os.makedirs(directory, exist_ok=True)
  for suffix, array in ((".npy", stream.tokens), (".offsets.npy", stream.offsets)):
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, prefix + suffix)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump({"num_documents": stream.num_documents, "num_chars": stream.num_chars,
               "num_tokens": stream.num_tokens}, f)
  os.replace(tmp, prefix + ".json")


def _load(prefix: str) -> Optional[TokenStream]:
  if not os.path.isfile(prefix + ".json"):
    return None
  with open(prefix + ".json") as f:
    meta = json.load(f)
  tokens = np.load(prefix + ".npy", mmap_mode="r")
  offsets = np.load(prefix + ".offsets.npy")
  if len(offsets) != meta["num_documents"] + 1 or len(tokens) != meta["num_tokens"]:
    return None  # a damaged entry: rebuild it
  return TokenStream(tokens, offsets, int(meta["num_chars"]))


def tokenized_split(data_cfg: DataConfig, tokenizer: Tokenizer, split: str,
                    cache_dir: Optional[str] = None) -> TokenStream:
  """The stream of one split of a text source, from the cache when possible."""
  cache_dir = cache_dir or data_cfg.cache_dir
  prefix = None
  if cache_dir:
    prefix = os.path.join(cache_dir, f"tokens-{cache_key(data_cfg, tokenizer, split)}")
    cached = _load(prefix)
    if cached is not None:
      return cached
  docs = sources.split_documents(sources.read_documents(data_cfg), data_cfg, split)
  stream = encode_documents(docs, tokenizer)
  if prefix:
    _save(stream, prefix)
  return stream
