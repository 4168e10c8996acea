"""The grain input pipeline: token stream -> fixed-length rows -> shard -> shuffle -> batch.

Layouts (one row = {"tokens": int32 [L], "token_mask": bool [L]}):
- wrap (MDLM): the split's stream BOS doc EOS BOS doc EOS ... cut into consecutive windows of
  L tokens. A repeating (training) pass drops the last partial window, so every row is full and
  token_mask is all True. A finite pass (evaluation) keeps it, padded with PAD and token_mask
  False there, so every token of the split is scored exactly once.
- pad: one document (BOS doc EOS) per row, truncated to L, padded with PAD; token_mask is False
  on padding.
- data.meap_sft=true (pad layout): one MEAP-SFT example per row (mdlm.data.sft), with a third
  array "labels": int32 [L], mdlm.data.sft.IGNORE where no loss is taken.

Rows are split across JAX processes by index (row i goes to process i mod P), then shuffled
with `seed` (reshuffled every epoch) and batched. A finite pass first appends all-padding rows
(token_mask all False) so that every process yields the same number of full batches.
The iterator's get_state()/set_state() is exact: restoring continues with the same batches.
"""

from __future__ import annotations

import math
from typing import Optional

import grain
import numpy as np

from mdlm.config import DataConfig
from mdlm.data import sft, sources
from mdlm.data.shards import ShardStream
from mdlm.data.streams import tokenized_split
from mdlm.data.tokenizers import Tokenizer
from mdlm.data.sft import IGNORE


def _row(tokens: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  row = np.full(seq_len, pad_id, np.int32)
  n = min(len(tokens), seq_len)
  row[:n] = tokens[:n]
  mask = np.zeros(seq_len, bool)
  mask[:n] = True
  return {"tokens": row, "token_mask": mask}


class WrapRows:
  """Windows [i*L, (i+1)*L) of the stream; `keep_tail` keeps the last partial one, padded."""

  def __init__(self, stream, seq_len: int, pad_id: int, keep_tail: bool):
    self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
    n = stream.num_tokens
    self._len = math.ceil(n / seq_len) if keep_tail else n // seq_len

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(i)
    return _row(self.stream.span(i * self.seq_len, (i + 1) * self.seq_len), self.seq_len,
                self.pad_id)


class DocumentRows:
  """Document i (BOS doc EOS), truncated to L and padded."""

  def __init__(self, stream, seq_len: int, pad_id: int):
    self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id

  def __len__(self):
    return self.stream.num_documents

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    return _row(self.stream.document(i), self.seq_len, self.pad_id)


class PaddedRows:
  """`rows` followed by all-padding rows (token_mask all False; labels, if any, all IGNORE) up
  to `total`."""

  def __init__(self, rows, total: int, seq_len: int, pad_id: int, labels: bool = False):
    self.rows, self.total = rows, total
    self._empty = {"tokens": np.full(seq_len, pad_id, np.int32),
                   "token_mask": np.zeros(seq_len, bool)}
    if labels:
      self._empty["labels"] = np.full(seq_len, IGNORE, np.int32)

  def __len__(self):
    return self.total

  def __getitem__(self, i):
    i = int(i)
    if i < len(self.rows):
      return self.rows[i]
    if i < self.total:
      return {k: v.copy() for k, v in self._empty.items()}
    raise IndexError(i)


def load_stream(data_cfg: DataConfig, tokenizer: Tokenizer, split: str,
                cache_dir: Optional[str] = None):
  """The token stream of a split: prepared shards, or a (cached) tokenization of a text source."""
  if split not in sources.SPLITS:
    raise ValueError(f"split={split!r}; choose one of {sources.SPLITS}")
  if data_cfg.source == "arrayrecord":
    return ShardStream(data_cfg.path, split, tokenizer)
  return tokenized_split(data_cfg, tokenizer, split, cache_dir)


def build_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, *, split: str, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  cache_dir: Optional[str] = None, shuffle: bool = True,
                  num_epochs: Optional[int] = None) -> grain.IterDataset:
  """A grain IterDataset of batches {"tokens": int32 [b, L], "token_mask": bool [b, L]} (plus
  "labels": int32 [b, L] with data.meap_sft=true).

  batch_size is the global batch; each of the `process_count` processes gets
  b = batch_size / process_count rows of its own share. num_epochs=None repeats forever
  (training); an integer makes a finite pass that covers every token of the split.
  """
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1 (or None to repeat forever).")
  b = batch_size // process_count
  L, pad = data_cfg.seq_len, tokenizer.pad_id
  repeat_forever = num_epochs is None
  if data_cfg.meap_sft:
    rows = sft.build_rows(data_cfg, tokenizer, split, seed=seed)
    what = f"{len(rows.records)} records"
  else:
    stream = load_stream(data_cfg, tokenizer, split, cache_dir)
    what = f"{stream.num_tokens} tokens in {stream.num_documents} documents"
    if data_cfg.layout == "wrap":
      rows = WrapRows(stream, L, pad, keep_tail=not repeat_forever)
    elif data_cfg.layout == "pad":
      rows = DocumentRows(stream, L, pad)
    else:
      raise ValueError(f"data.layout={data_cfg.layout!r}; choose wrap or pad")
  if len(rows) < process_count:
    raise ValueError(
        f"The {split} split has {what}: {len(rows)} row(s) of data.seq_len={L} "
        f"({data_cfg.layout} layout), fewer than the {process_count} process(es). Lower "
        "data.seq_len or add data.")
  if not repeat_forever:
    rows = PaddedRows(rows, math.ceil(len(rows) / batch_size) * batch_size, L, pad,
                      labels=data_cfg.meap_sft)
  ds = grain.MapDataset.source(rows)
  if shuffle:
    ds = ds.shuffle(seed)
  if repeat_forever or num_epochs > 1:
    ds = ds.repeat(num_epochs)
  ds = ds.batch(b, drop_remainder=True)
  if process_count > 1:
    # Global batch g is the chunks g P, ..., g P + P - 1 of b consecutive rows of the one shuffled
    # order, and this process takes chunk g P + process_index: the global batch, and so every
    # loss, is the same whatever the number of processes.
    ds = ds[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_workers))


def split_stats(data_cfg: DataConfig, tokenizer: Tokenizer, split: str,
                cache_dir: Optional[str] = None) -> dict[str, int]:
  """Size of a split, for bits per character.

  num_tokens counts the whole stream, BOS and EOS of every document included: exactly the tokens
  a finite wrap-layout pass scores. Bits per character = (summed NLL in nats) / ln 2 / num_chars.
  (The pad layout truncates documents longer than L, so there it scores fewer tokens.)
  """
  if data_cfg.meap_sft:
    # The loss is on response labels only, not on a stream of every token: no bits per
    # character (num_tokens 0 tells mdlm.evaluate to leave bpc out).
    records = sft.load_records(data_cfg, tokenizer, split)
    return {"num_documents": len(records), "num_chars": records.num_chars, "num_tokens": 0}
  stream = load_stream(data_cfg, tokenizer, split, cache_dir)
  return {"num_documents": int(stream.num_documents), "num_chars": int(stream.num_chars),
          "num_tokens": int(stream.num_tokens)}


def token_counts(data_cfg: DataConfig, tokenizer: Tokenizer, split: str = "train",
                 cache_dir: Optional[str] = None, max_tokens: int = 50_000_000) -> np.ndarray:
  """How often each token id occurs in (the first `max_tokens` tokens of) a split: int64 [V]."""
  stream = load_stream(data_cfg, tokenizer, split, cache_dir)
  tokens = stream.span(0, min(stream.num_tokens, max_tokens))
  return np.bincount(np.asarray(tokens, np.int64), minlength=tokenizer.vocab_size)
