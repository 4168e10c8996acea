"""The layout of a prepared shard directory and its meta.json: no tokenizer, no ArrayRecord.

Its own module so that both layers above it can read it: `tokenizers` (which loads the tokenizer
saved with the shards) and `shards` (which writes and reads the token records, and needs the
Tokenizer type). Layout of a directory written by `python -m mdlm.data.prepare`:

  meta.json                   format, token dtype, tokenizer fingerprint, per-split counts+shards
  tokenizer/                  the tokenizer (`mdlm.data.load_tokenizer`)
  <split>.lengths.npy         tokens per document (without BOS/EOS), in record order
  <split>-NNNNN.arrayrecord   one record per document: its token ids as little-endian uint16 (if
                              V <= 65536) or int32 bytes, without BOS/EOS
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

FORMAT = "mdlm-token-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def read_meta(path: Optional[str]) -> dict:
  """meta.json of a prepared directory; a ValueError naming the fix if it is not one."""
  if not path:
    raise ValueError("data.source=arrayrecord needs data.path: a directory written by "
                     "`python -m mdlm.data.prepare`.")
  meta_path = os.path.join(os.path.expanduser(path), META_FILE)
  if not os.path.isfile(meta_path):
    raise ValueError(f"data.path={path!r} holds no {META_FILE}: it is not a directory written by "
                     "`python -m mdlm.data.prepare` (or that command did not finish); run it "
                     f"with --out {path}.")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: unsupported shard format {meta.get('format')!r} version "
                     f"{meta.get('version')!r}; re-run `python -m mdlm.data.prepare`.")
  return meta


def tokenizer_dir(path: Optional[str]) -> str:
  """Where the shards at `path` keep their tokenizer (after checking that they are shards)."""
  read_meta(path)
  return os.path.join(os.path.expanduser(path), TOKENIZER_DIR)
