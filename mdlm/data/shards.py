"""Pre-tokenized ArrayRecord shards: the token records `python -m mdlm.data.prepare` writes.

The directory layout and meta.json are described (and read) in `mdlm.data.shard_format`, the
layer below both this module and `mdlm.data.tokenizers`. Documents are read by random access, so
a window of the wrap layout reads only the documents it overlaps; memory holds one offset per
document, not the corpus.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mdlm.data.shard_format import FORMAT, FORMAT_VERSION, META_FILE, TOKENIZER_DIR, read_meta, \
    token_dtype
from mdlm.data.tokenizers import Tokenizer


class SplitWriter:
  """Writes one split's documents to shards of about `shard_tokens` tokens each."""

  def __init__(self, out_dir: str, split: str, dtype: np.dtype, shard_tokens: int):
    self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
    self.shards: list[str] = []
    self.lengths: list[int] = []
    self.num_chars = 0
    self._writer = None
    self._shard_fill = 0

  def write(self, ids: Iterable[int], num_chars: int) -> None:
    ids = np.asarray(ids, self.dtype)
    if self._writer is None or self._shard_fill >= self.shard_tokens:
      self._close_shard()
      name = f"{self.split}-{len(self.shards):05d}.arrayrecord"
      # group_size:1 makes every record its own chunk: cheap random access by record index.
      self._writer = ArrayRecordWriter(os.path.join(self.out_dir, name), "group_size:1")
      self.shards.append(name)
    self._writer.write(ids.tobytes())
    self._shard_fill += len(ids)
    self.lengths.append(len(ids))
    self.num_chars += num_chars

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self._shard_fill = 0

  def close(self) -> dict:
    self._close_shard()
    lengths = np.asarray(self.lengths, np.int64)
    np.save(os.path.join(self.out_dir, f"{self.split}.lengths.npy"), lengths)
    return {"shards": self.shards, "num_documents": len(lengths), "num_chars": self.num_chars,
            "num_tokens": int(lengths.sum() + 2 * len(lengths))}


def write_meta(out_dir: str, tokenizer: Tokenizer, splits: dict, corpus: dict,
               split_settings: dict) -> None:
  meta = {"format": FORMAT, "version": FORMAT_VERSION,
          "dtype": token_dtype(tokenizer.vocab_size).str, "vocab_size": tokenizer.vocab_size,
          "tokenizer_fingerprint": tokenizer.fingerprint, "corpus": corpus,
          "split": split_settings, "splits": splits}
  with open(os.path.join(out_dir, META_FILE), "w") as f:
    json.dump(meta, f, indent=1)


class ShardStream:
  """A split of prepared shards read as a token stream (the same interface as TokenStream)."""

  def __init__(self, path: str, split: str, tokenizer: Tokenizer):
    meta = read_meta(path)
    path = os.path.expanduser(path)
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
      raise ValueError(f"The shards at {path} were tokenized with a different tokenizer; build "
                       "it with mdlm.data.build_tokenizer (which loads "
                       f"{os.path.join(path, TOKENIZER_DIR)}).")
    if split not in meta["splits"]:
      raise ValueError(f"The shards at {path} have no split {split!r} (they have "
                       f"{sorted(meta['splits'])}).")
    info = meta["splits"][split]
    self.paths = [os.path.join(path, s) for s in info["shards"]]
    self.dtype = np.dtype(meta["dtype"])
    self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id
    lengths = np.load(os.path.join(path, f"{split}.lengths.npy"))
    self.offsets = np.concatenate([[0], np.cumsum(lengths + 2)]).astype(np.int64)
    self.num_chars = int(info["num_chars"])
    self._source = None

  @property
  def source(self):
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # reopened lazily in the unpickling process
    return state

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  def _wrapped(self, record: bytes) -> np.ndarray:
    body = np.frombuffer(record, self.dtype).astype(np.int32)
    return np.concatenate([[self.bos_id], body, [self.eos_id]]).astype(np.int32)

  def document(self, k: int) -> np.ndarray:
    return self._wrapped(self.source[int(k)])

  def span(self, start: int, stop: int) -> np.ndarray:
    stop = min(stop, self.num_tokens)
    if stop <= start:
      return np.zeros(0, np.int32)
    first = int(np.searchsorted(self.offsets, start, side="right")) - 1
    last = int(np.searchsorted(self.offsets, stop, side="left"))  # exclusive
    records = self.source.__getitems__(list(range(first, last)))
    stream = np.concatenate([self._wrapped(r) for r in records])
    base = int(self.offsets[first])
    return stream[start - base:stop - base]
