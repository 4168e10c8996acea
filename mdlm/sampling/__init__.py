"""Samplers for masked diffusion language models.

Every sampler is a pure function compiled whole with jax.jit: it takes a denoiser callable
`denoise(xt_BxL, t_B) -> logits_BxLxV` (the sampler applies SUBS), a key, the starting sequence
xt (all mask_id for unconditional generation; given tokens + mask_id to infill or prompt) and its
settings, and returns (tokens, stats) with stats["nfe"] (denoiser calls) and stats["steps"].
Denoisers that also offer features/logits_at (mdlm.sampling.denoisers.stages) get their output
head evaluated only at the positions a step fills.

  denoise = denoiser_from_model(model, schedule)          # a trained mdlm denoiser
  tokens, stats = ancestral(key, denoise, xt, steps=1000, schedule=schedule,
                            mask_id=model.mask_id)        # cached (step-skipping) by default
  tokens, stats = confidence(key, denoise, xt, steps=64, mask_id=model.mask_id, block_length=32)
  tokens, stats = cached_confidence(key, denoise, xt, steps=1024, mask_id=model.mask_id,
                                    block_length=32, threshold=0.9, kv_cache="dual")  # Fast-dLLM
  tokens, stats = block_sample(key, denoise, xt, block_size=16, mask_id=model.mask_id,
                               steps=64, schedule=schedule, eos_id=tokenizer.eos_id)  # BD3-LM
  tokens, stats = semi_autoregressive(key, denoise, xt_long, window=128, stride=64,
                                      steps=128, schedule=schedule, mask_id=model.mask_id)
  cfg_denoise = guided(denoise, prompt_mask, w=1.0)
  results, stats = infill(key, denoise, tokenizer, "The [MASK*5] of Denmark", steps=100, ...)
"""

from mdlm.sampling.ancestral_sampler import ancestral, time_grid
from mdlm.sampling.block import block_sample
from mdlm.categorical import categorical, inverse_cdf, top_p_filter
from mdlm.sampling.confidence_sampler import confidence
from mdlm.sampling.fast_dllm import cached_confidence
from mdlm.sampling.denoisers import (Guided, ModelDenoiser, denoiser_from_model, guided,
                                     shard_denoiser)
from mdlm.sampling.metrics import (generative_perplexity, generative_perplexity_text,
                                   unigram_entropy)
from mdlm.sampling.semi_ar import semi_autoregressive, window_starts
from mdlm.sampling.text import (decode, infill, parse_template, prompt_tokens, run_sampler)

__all__ = [
    "ancestral", "confidence", "semi_autoregressive", "block_sample", "guided", "denoiser_from_model",
    "shard_denoiser", "cached_confidence",
    "ModelDenoiser", "Guided", "categorical", "inverse_cdf", "top_p_filter", "time_grid",
    "window_starts", "infill", "parse_template", "prompt_tokens", "decode", "run_sampler",
    "generative_perplexity", "generative_perplexity_text", "unigram_entropy",
]
