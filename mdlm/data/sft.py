"""MEAP-SFT rows: (prompt, response) records -> padded examples with per-position labels.

data.meap_sft=true (Zhuang et al. 2025, "Mask-Enhanced Autoregressive Prediction", fine-tuning
variant; their reference code MEAP-SFT.py). Each JSON Lines record {prompt_field, response_field}
is tokenized with the run's tokenizer as

  prompt = [BOS] + encode(prompt text),   response = encode(response text)

and yields the rows of `sft_examples` below:
  1. the plain example prompt + response + EOS, labels on the response and the EOS;
  2. when len(response) > data.meap_sft_min_response (paper: 50), a copy with
     round(data.meap_sft_ratio * n) (paper: 10%, at least 1) of its n response tokens replaced by
     the mask id and labels only at those positions.
A row is {"tokens": int32 [L], "token_mask": bool [L], "labels": int32 [L]} with labels
IGNORE (-1) wherever no loss is taken: the prompt, the padding, the unmasked tokens of
the copy. labels[i] is the target of the prediction made at position i - 1 (mdlm.meap.sft_terms).

Which tokens a copy masks depends only on (seed, the record's index in the corpus): a row is a
pure function of its index, so the grain iterator state restores exactly and a resumed run sees
the same copies. (As in the reference code the copies are fixed, not redrawn every epoch.)

Lengths: a sequence longer than data.seq_len is truncated to seq_len tokens (the response is
cut, the last token is EOS and carries no label, and the copy masks only response tokens that
fit). A prompt so long that no response token fits (len(prompt) + 2 > seq_len, BOS included) is
refused, naming the records and the fix: training on it would score nothing.

Splits: records fall in train / val by index exactly as documents do (sources.split_indices).
Validation rows are the plain examples only, so val/nll is nats per response token (EOS
included), comparable with a fine-tuning run without MEAP-SFT.
"""

from __future__ import annotations

import dataclasses
import random as random_lib
from typing import Sequence

import numpy as np

from mdlm.config import DataConfig
from mdlm.masking import mask_count
from mdlm.data import sources
from mdlm.data.tokenizers import Tokenizer

IGNORE = -1  # label value for positions that carry no loss in SFT examples


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """inputs[i] is fed at position i; labels[i] is the target of the prediction made at position
  i - 1 (the label aligned with the token it names); IGNORE marks positions without loss."""

  inputs: list[int]
  labels: list[int]


def sft_examples(prompt: Sequence[int], response: Sequence[int], *, mask_id: int, eos_id: int,
                 ratio: float = 0.1, min_response_len: int = 50, max_len: int | None = None,
                 rng: random_lib.Random | None = None) -> list[SFTExample]:
  """The MEAP fine-tuning examples of one (prompt, response) pair, as token lists.

  1. The ordinary example: prompt + response + EOS, labels on the response and EOS.
  2. If len(response) > min_response_len: a copy of prompt + response in which
     max(1, mask_count(n, ratio)) of the n response tokens (inside max_len) are replaced by mask_id,
     with labels only at those positions (the clean tokens there), then EOS (no label).
  Sequences longer than max_len are cut to max_len tokens, the last one EOS. That EOS carries no
  label: the response did not end there, and labelling it would teach the model to stop at the
  cut. A prompt that leaves no room for a response token is refused.
  """
  prompt, response = list(map(int, prompt)), list(map(int, response))
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio must lie in (0, 1), got {ratio}.")
  if max_len is not None and max_len < len(prompt) + 2:
    raise ValueError(f"max_len={max_len} leaves no room for the response after a "
                     f"{len(prompt)}-token prompt; raise max_len or shorten the prompt.")
  if mask_id in prompt + response:
    raise ValueError(f"the mask id {mask_id} already occurs in the prompt or response.")
  rng = rng or random_lib.Random(0)
  limit = max_len if max_len is not None else len(prompt) + len(response) + 1

  inputs = (prompt + response)[: limit - 1] + [eos_id]
  labels = [IGNORE] * len(prompt) + inputs[len(prompt):]
  if len(prompt) + len(response) + 1 > limit:  # cut: the EOS marks the cut, not the end
    labels[-1] = IGNORE
  examples = [SFTExample(inputs, labels[: len(inputs)])]

  if len(response) > min_response_len:
    copy = (prompt + response)[: limit - 1]
    positions = list(range(len(prompt), len(copy)))
    count = max(1, mask_count(len(positions), ratio))
    chosen = sorted(rng.sample(positions, count))
    masked_inputs, masked_labels = list(copy), [IGNORE] * len(copy)
    for pos in chosen:
      masked_inputs[pos] = mask_id
      masked_labels[pos] = copy[pos]
    examples.append(SFTExample(masked_inputs + [eos_id], masked_labels + [IGNORE]))
  return examples


def pad_examples(examples: Sequence[SFTExample], length: int, pad_id: int):
  """Stacks examples into {"tokens", "labels", "token_mask"} numpy arrays of width `length`."""
  n = len(examples)
  tokens = np.full((n, length), pad_id, np.int32)
  labels = np.full((n, length), IGNORE, np.int32)
  mask = np.zeros((n, length), bool)
  for row, ex in enumerate(examples):
    if len(ex.inputs) > length:
      raise ValueError(f"example {row} has {len(ex.inputs)} tokens > length {length}.")
    tokens[row, : len(ex.inputs)] = ex.inputs
    labels[row, : len(ex.labels)] = ex.labels
    mask[row, : len(ex.inputs)] = True
  return {"tokens": tokens, "labels": labels, "token_mask": mask}


@dataclasses.dataclass
class SFTRecords:
  """Tokenized records of one split. prompts[k] starts with BOS; index_K holds each record's
  index in the whole corpus (its masking seed); where[k] is "file:line"."""

  prompts: list[np.ndarray]
  responses: list[np.ndarray]
  index_K: np.ndarray
  where: list[str]
  num_chars: int

  def __len__(self):
    return len(self.prompts)


def load_records(data_cfg: DataConfig, tokenizer: Tokenizer, split: str) -> SFTRecords:
  """The records of one split, tokenized (kept in memory: SFT sets are small)."""
  records = sources.read_sft_records(data_cfg)
  index_K = sources.split_indices(len(records), data_cfg, split)
  chosen = [records[i] for i in index_K]
  prompts = tokenizer.encode_batch([p for p, _, _ in chosen])
  responses = tokenizer.encode_batch([r for _, r, _ in chosen])
  bos = [int(tokenizer.bos_id)]
  return SFTRecords(
      prompts=[np.asarray(bos + list(p), np.int32) for p in prompts],
      responses=[np.asarray(list(r), np.int32) for r in responses],
      index_K=np.asarray(index_K, np.int64), where=[w for _, _, w in chosen],
      num_chars=sum(len(p) + len(r) for p, r, _ in chosen))


def mask_rng(seed: int, record_index: int) -> random_lib.Random:
  """The generator of a record's masked copy: a function of (seed, index) only (a str seed is
  hashed with SHA-512, independent of PYTHONHASHSEED and of the process)."""
  return random_lib.Random(f"meap-sft:{int(seed)}:{int(record_index)}")


class SFTRows:
  """Row j: example `copy_J[j]` (0 plain, 1 masked) of record `record_J[j]`, padded to seq_len."""

  def __init__(self, records: SFTRecords, seq_len: int, *, pad_id: int, eos_id: int,
               mask_id: int, ratio: float, min_response_len: int, seed: int,
               masked_copies: bool):
    too_long = [(w, len(p)) for w, p in zip(records.where, records.prompts) if len(p) + 2 > seq_len]
    if too_long:
      shown = ", ".join(f"{w} ({n} tokens)" for w, n in too_long[:3])
      raise ValueError(
          f"{len(too_long)} record(s) have a prompt (BOS included) that leaves no room for a "
          f"response token within data.seq_len={seq_len}: {shown}"
          f"{', ...' if len(too_long) > 3 else ''}. Raise data.seq_len (and model.max_seq_len), "
          "or shorten or drop these prompts.")
    self.records, self.seq_len = records, seq_len
    self.pad_id, self.eos_id, self.mask_id = pad_id, eos_id, mask_id
    self.ratio, self.min_response_len, self.seed = ratio, min_response_len, seed
    has_copy_K = np.asarray([masked_copies and len(r) > min_response_len
                             for r in records.responses], bool)
    # Each record's plain row, then (where it has one) its masked copy right after it.
    rows_K = 1 + has_copy_K.astype(np.int64)
    self.record_J = np.repeat(np.arange(len(records)), rows_K)
    self.copy_J = np.arange(int(rows_K.sum())) - np.repeat(np.cumsum(rows_K) - rows_K, rows_K)

  def __len__(self):
    return len(self.record_J)

  def examples(self, k: int) -> list[SFTExample]:
    """Every example of record k (the plain one, then the masked copy if any)."""
    return sft_examples(
        self.records.prompts[k], self.records.responses[k], mask_id=self.mask_id,
        eos_id=self.eos_id, ratio=self.ratio, min_response_len=self.min_response_len,
        max_len=self.seq_len, rng=mask_rng(self.seed, self.records.index_K[k]))

  def __getitem__(self, j):
    j = int(j)
    if not 0 <= j < len(self):
      raise IndexError(j)
    example = self.examples(int(self.record_J[j]))[int(self.copy_J[j])]
    padded = pad_examples([example], self.seq_len, self.pad_id)
    return {k: v[0] for k, v in padded.items()}


def build_rows(data_cfg: DataConfig, tokenizer: Tokenizer, split: str, *, seed: int) -> SFTRows:
  """The rows of one split: masked copies in the train split only (see the module docstring).
  The mask id is the tokenizer's vocab_size, the model's mask id (mdlm.models.Transformer)."""
  return SFTRows(load_records(data_cfg, tokenizer, split), data_cfg.seq_len,
                 pad_id=int(tokenizer.pad_id), eos_id=int(tokenizer.eos_id),
                 mask_id=int(tokenizer.vocab_size), ratio=data_cfg.meap_sft_ratio,
                 min_response_len=data_cfg.meap_sft_min_response, seed=seed,
                 masked_copies=split == "train")
