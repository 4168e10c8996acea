"""Data: text sources, tokenizers and the grain input pipeline.

  tok = build_tokenizer(cfg.tokenizer, cfg.data, cache_dir)
  ds = build_dataset(cfg.data, tok, split="train", batch_size=32, seed=0, cache_dir=cache_dir)
  it = iter(ds); batch = next(it)   # {"tokens": int32 [b, L], "token_mask": bool [b, L]}
                                    # (+ "labels": int32 [b, L] with data.meap_sft: mdlm.data.sft)
  state = it.get_state(); ...; it.set_state(state)

Pre-tokenized shards for large corpora: `python -m mdlm.data.prepare --help`.
"""

from mdlm.data.pipeline import build_dataset, load_stream, split_stats, token_counts
from mdlm.data.sources import is_val, iter_documents, read_documents, split_documents
from mdlm.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer, Tokenizer,
                                  build_tokenizer, load_tokenizer, train_sentencepiece)

__all__ = [
    "build_dataset", "build_tokenizer", "load_tokenizer", "split_stats", "load_stream",
    "token_counts",
    "Tokenizer", "ByteTokenizer", "CharTokenizer", "SentencePieceTokenizer",
    "train_sentencepiece", "iter_documents", "read_documents", "split_documents", "is_val",
]
