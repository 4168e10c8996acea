"""Text front end: prompts and infill templates to token sequences, samples back to text.

A template marks what to fill with `[MASK]` (one token) or `[MASK*n]` (n tokens), for example
"The [MASK*5] of Denmark". The text between markers is tokenized piece by piece, so the given
tokens are exactly the tokenizer's encoding of each piece. Any tokenizer with `encode`,
`decode`, `vocab_size`, `bos_id` and `eos_id` serves (mdlm.data tokenizers do).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from mdlm.sampling.ancestral_sampler import ancestral
from mdlm.sampling.block import block_sample
from mdlm.sampling.confidence_sampler import confidence
from mdlm.sampling.fast_dllm import cached_confidence
from mdlm.sampling.maria import maria_infill
from mdlm.sampling.semi_ar import semi_autoregressive

MARKER = re.compile(r"\[MASK(?:\*(\d+))?\]")
SAMPLERS = ("ancestral", "confidence", "semi_ar", "maria", "block")


@dataclasses.dataclass
class Template:
  """A parsed template: token ids with mask_id at the positions to fill."""

  tokens: np.ndarray                 # int32 [length]
  spans: list[tuple[int, int]]       # [start, end) token positions of each marker

  @property
  def fill_mask(self) -> np.ndarray:
    mask = np.zeros(len(self.tokens), bool)
    for start, end in self.spans:
      mask[start:end] = True
    return mask


def parse_template(template: str, tokenizer, mask_id: int, *, add_bos: bool = True,
                   length: Optional[int] = None) -> Template:
  """Tokenizes around the mask markers. length > template length appends masks (continuation)."""
  if not isinstance(template, str):
    raise ValueError(f"template must be a string, got {type(template).__name__}.")
  markers = list(MARKER.finditer(template))
  if not markers:
    raise ValueError(f"template {template!r} has no mask marker; mark the text to fill with "
                     "[MASK] (one token) or [MASK*n] (n tokens), e.g. 'The [MASK*5] of Denmark'.")
  ids: list[int] = [int(tokenizer.bos_id)] if add_bos else []
  spans = []
  cursor = 0
  for match in markers:
    ids += [int(i) for i in tokenizer.encode(template[cursor:match.start()])] \
        if match.start() > cursor else []
    count = int(match.group(1)) if match.group(1) is not None else 1
    if count < 1:
      raise ValueError(f"template marker {match.group(0)!r} asks for {count} tokens; use n >= 1.")
    spans.append((len(ids), len(ids) + count))
    ids += [mask_id] * count
    cursor = match.end()
  if cursor < len(template):
    ids += [int(i) for i in tokenizer.encode(template[cursor:])]
  if length is not None:
    if length < len(ids):
      raise ValueError(f"the template is {len(ids)} tokens long, longer than length={length}; "
                       f"use length >= {len(ids)} or a shorter template.")
    if length > len(ids):
      spans.append((len(ids), length))
      ids += [mask_id] * (length - len(ids))
  return Template(np.asarray(ids, np.int32), spans)


def prompt_tokens(tokenizer, prompt: Optional[str], length: int, mask_id: int, *,
                  add_bos: bool = True) -> np.ndarray:
  """[BOS] + encode(prompt) followed by masks up to `length` (int32 [length])."""
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}.")
  ids = [int(tokenizer.bos_id)] if add_bos else []
  if prompt:
    ids += [int(i) for i in tokenizer.encode(prompt)]
  if len(ids) > length:
    raise ValueError(f"the prompt is {len(ids)} tokens long (BOS included), longer than "
                     f"length={length}; use length > {len(ids)} or a shorter prompt.")
  return np.asarray(ids + [mask_id] * (length - len(ids)), np.int32)


def decode(tokenizer, ids: Sequence[int]) -> str:
  """Text of a sample: documents separated by BOS/EOS become lines; specials and masks dropped."""
  docs, current = [], []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i in (tokenizer.bos_id, tokenizer.eos_id):
      if current:
        docs.append(current)
      current = []
    else:
      current.append(i)
  if current:
    docs.append(current)
  return "\n".join(tokenizer.decode(d) for d in docs)


def run_sampler(key, denoise, xt, *, sampler: str = "ancestral", **settings):
  """Dispatches to ancestral / confidence / semi_ar (window, stride, inner=... for semi_ar), block
  (block_size, inner=..., context, kv_cache, eos_id; mdlm.sampling.block), or
  to maria (mdlm.sampling.maria.maria_infill; `denoise` is then a MariaHead)."""
  if sampler == "ancestral":
    return ancestral(key, denoise, xt, **settings)
  if sampler == "confidence":
    if "kv_cache" in settings or "kv_refresh" in settings:  # Fast-dLLM's KV caches
      return cached_confidence(key, denoise, xt, **settings)
    return confidence(key, denoise, xt, **settings)
  if sampler == "semi_ar":
    settings = dict(settings)
    inner = settings.pop("inner", "ancestral")
    return semi_autoregressive(key, denoise, xt, sampler=inner, **settings)
  if sampler == "block":  # block diffusion with an exact KV cache (mdlm.sampling.block)
    return block_sample(key, denoise, xt, **settings)
  if sampler == "maria":  # here `denoise` is a mdlm.models.hybrid.MariaHead
    return maria_infill(key, denoise, xt, **settings)
  raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")


def infill(key, denoise, tokenizer, template: str, *, mask_id: int, num_samples: int = 1,
           length: Optional[int] = None, add_bos: bool = True, sampler: str = "ancestral",
           **settings) -> tuple[list[dict], dict]:
  """Fills a template's markers. Returns ([{"text", "fills", "tokens"}] per sample, stats)."""
  parsed = parse_template(template, tokenizer, mask_id, add_bos=add_bos, length=length)
  xt = jnp.broadcast_to(jnp.asarray(parsed.tokens), (num_samples, len(parsed.tokens)))
  tokens, stats = run_sampler(key, denoise, xt, sampler=sampler, mask_id=mask_id, **settings)
  tokens = np.asarray(tokens)
  out = []
  for row in tokens:
    out.append({"text": decode(tokenizer, row),
                "fills": [tokenizer.decode(row[s:e]) for s, e in parsed.spans],
                "tokens": row.tolist()})
  return out, stats
