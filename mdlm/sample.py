"""Sampling CLI: `python -m mdlm.sample run=<run dir or checkpoint> [hydra overrides]`.

  python -m mdlm.sample run=runs/x num_samples=8                         # MDLM ancestral, cached
  python -m mdlm.sample run=runs/x sampler=confidence sampler.steps=64 sampler.block_length=32
  python -m mdlm.sample run=runs/x sampler=fast_dllm
  python -m mdlm.sample run=runs/x sampler=semi_ar length=1024 sampler.stride=64
  python -m mdlm.sample run=runs/x 'prompt="To be, or not to be"' length=128
  python -m mdlm.sample run=runs/x 'template="The [MASK*5] of Denmark"' sampler.steps=100
  python -m mdlm.sample run=runs/x evaluator=runs/ar      # + generative perplexity
  python -m mdlm.sample run=runs/maria sampler=maria 'template="The [MASK*5] of Denmark"'
      # a MARIA run (experiment=maria): denoiser pass + KV-cached AR decoding through the head
  python -m mdlm.sample run=runs/x mesh=fsdp batch_size=64   # parameters and batch over devices

Writes the text of each sample to stdout and one JSON object per sample to a JSON Lines file
(`output=`, default <run>/samples/<sampler>-seed<seed>.jsonl); a summary (NFE, unigram entropy,
generative perplexity with an evaluator) goes to stderr and to <output>.summary.json. Settings
are the typed dataclasses of mdlm/sampling/config.py; presets live in configs/sampler/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mdlm.sampling import config as config_lib

def _starting_sequence(cfg: config_lib.SampleConfig, tokenizer, mask_id: int, length: int):
  """(xt [length] with mask_id where to fill, marker spans or None)."""
  from mdlm.sampling import text
  if cfg.template:
    parsed = text.parse_template(cfg.template, tokenizer, mask_id, add_bos=cfg.add_bos,
                                 length=length if cfg.length is not None else None)
    return parsed.tokens, parsed.spans
  if cfg.prompt:
    return text.prompt_tokens(tokenizer, cfg.prompt, length, mask_id, add_bos=cfg.add_bos), None
  return np.full((length,), mask_id, np.int32), None


def _load(cfg: config_lib.SampleConfig):
  """(loaded run, what run_sampler samples with: a denoiser, or the MARIA head for maria).

  sampler=maria needs a MARIA run (objective=maria) and any other sampler a run that is not one:
  a mismatch is refused before any weights load."""
  from mdlm import checkpointing
  from mdlm import config as train_config
  from mdlm import sampling
  run_dir, _ = checkpointing._find_run_dir(cfg.run)
  objective = train_config.objective(checkpointing.load_config(run_dir))
  if cfg.sampler.name == "maria":
    if objective != "maria":
      raise ValueError(
          f"sampler=maria needs a MARIA run (python -m mdlm.train experiment=maria "
          f"train.maria_denoiser_run=... train.maria_ar_run=...); {run_dir} was trained with "
          f"train.objective={objective}. Pass run=<a MARIA run directory>, or choose another "
          "sampler (e.g. sampler=ancestral).")
    from mdlm.models import hybrid
    loaded = hybrid.load_maria_checkpoint(cfg.run, ema=cfg.ema, step=cfg.step)
    return loaded, loaded.head
  if objective == "maria":
    raise ValueError(
        f"{run_dir} is a MARIA run (train.objective=maria): sample from it with sampler=maria, "
        "or pass the denoiser run it was built on with this sampler.")
  loaded = checkpointing.load_run(cfg.run, ema=cfg.ema, step=cfg.step)
  return loaded, sampling.denoiser_from_model(loaded.model, loaded.config.noise.build())


def _mesh(cfg: config_lib.SampleConfig):
  """The device mesh (None on one device), checked against batch_size before anything loads."""
  from mdlm import sharding
  m = cfg.mesh
  mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
  sharding.rules_dict(m.rules)
  if mesh.size == 1 or cfg.sampler.name == "maria":
    return None
  split = sharding.batch_divisor(mesh)
  if cfg.batch_size % split:
    raise ValueError(
        f"batch_size={cfg.batch_size} is not a multiple of the {split} batch shards of the mesh "
        f"(data, fsdp, tensor)={tuple(mesh.shape.values())}; set batch_size="
        f"{-(-cfg.batch_size // split) * split}, or mesh.data/mesh.fsdp so that "
        "data x fsdp divides it.")
  return mesh


def run(cfg: config_lib.SampleConfig) -> dict:
  """Samples, writes the JSON Lines file and returns the summary."""
  config_lib.validate(cfg)
  from mdlm import sampling, sharding
  s = cfg.sampler
  mesh = _mesh(cfg)
  loaded, denoise = _load(cfg)
  if mesh is not None:
    denoise = sampling.shard_denoiser(denoise, mesh, cfg.mesh.rules)
  tokenizer, train_cfg = loaded.tokenizer, loaded.config
  model = loaded.head if s.name == "maria" else loaded.model
  schedule = train_cfg.noise.build()
  mask_id = model.mask_id
  length = cfg.length or train_cfg.data.seq_len
  xt_L, spans = _starting_sequence(cfg, tokenizer, mask_id, length)
  length = len(xt_L)
  if s.name == "maria" and length > model.max_seq_len:
    raise ValueError(f"length={length} exceeds the MARIA backbones' max_seq_len="
                     f"{model.max_seq_len}; use length <= {model.max_seq_len} (or a shorter "
                     "template).")
  settings = s.settings(schedule, mask_id)
  if s.name == "semi_ar":
    settings["window"] = min(settings["window"] or model.cfg.max_seq_len, length)
    settings["stride"] = settings["stride"] or max(1, settings["window"] // 2)
  if s.guidance:
    denoise = sampling.guided(denoise, jnp.asarray(xt_L != mask_id), s.guidance)

  output = cfg.output or os.path.join(loaded.run_dir, "samples", f"{s.name}-seed{cfg.seed}.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  num_batches = -(-cfg.num_samples // cfg.batch_size)
  key = jax.random.key(cfg.seed)
  bar = None
  if cfg.progress and num_batches > 1:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.num_samples, desc=f"sampling ({s.name})", unit="sample", file=sys.stderr)
  samples, nfe_total, t0 = [], 0, time.time()
  for b in range(num_batches):
    count = min(cfg.batch_size, cfg.num_samples - b * cfg.batch_size)
    # Every batch has batch_size rows (one compile); the surplus rows of the last are dropped.
    xt = jnp.broadcast_to(jnp.asarray(xt_L), (cfg.batch_size, length))
    if mesh is not None:
      xt = jax.device_put(xt, sharding.batch_sharding(mesh))
    tokens, stats = sampling.run_sampler(jax.random.fold_in(key, b), denoise, xt,
                                         sampler=s.name, **settings)
    nfe_total += int(stats["nfe"])
    for row in np.asarray(tokens)[:count]:
      item = {"index": len(samples), "text": sampling.decode(tokenizer, row),
              "tokens": row.tolist(), "nfe": int(stats["nfe"])}
      if spans is not None:
        item["fills"] = [tokenizer.decode(row[a:e]) for a, e in spans]
      samples.append(item)
    if bar is not None:
      bar.update(count)
  if bar is not None:
    bar.close()
  seconds = time.time() - t0

  specials = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id", -1)}
  token_rows = np.asarray([it["tokens"] for it in samples])
  summary = {
      "run": loaded.run_dir, "step": loaded.step, "sampler": dataclasses.asdict(s),
      "num_samples": len(samples), "length": length, "seed": cfg.seed,
      "nfe_per_batch": nfe_total / num_batches, "seconds": seconds,
      "unigram_entropy": sampling.unigram_entropy(token_rows, ignore=specials)["mean"],
  }
  if cfg.evaluator:
    summary.update(_gen_ppl(cfg.evaluator, samples, tokenizer))
  with open(output, "w") as f:
    for item in samples:
      f.write(json.dumps({**item, "sampler": s.name, "step": loaded.step}) + "\n")
  with open(output + ".summary.json", "w") as f:
    json.dump(summary, f, indent=1)
  summary["output"] = output
  summary["samples"] = samples
  return summary


def _gen_ppl(evaluator: str, samples, tokenizer) -> dict:
  from mdlm import checkpointing
  from mdlm.sampling import metrics
  ev = checkpointing.load_run(evaluator)
  same = getattr(ev.tokenizer, "fingerprint", None) == getattr(tokenizer, "fingerprint", 0)
  if same:  # score the sampled tokens directly (drop only padding and leftover masks)
    seqs = metrics.strip_specials([it["tokens"] for it in samples], [tokenizer.pad_id],
                                  mask_id=tokenizer.vocab_size)
    out = metrics.generative_perplexity(ev.model, seqs, pad_id=int(ev.tokenizer.pad_id))
  else:
    out = metrics.generative_perplexity_text(ev.model, ev.tokenizer, [it["text"] for it in samples])
  return {"evaluator": ev.run_dir, "gen_ppl": out["gen_ppl"], "gen_nll": out["nll"],
          "gen_tokens": out["num_tokens"], "evaluator_retokenized": not same}


def _print(summary: dict, print_samples: bool) -> None:
  if print_samples:
    for item in summary["samples"]:
      print(f"=== sample {item['index']} ===")
      print(item["text"])
      if "fills" in item:
        print(f"--- fills: {item['fills']}")
  brief = {k: v for k, v in summary.items() if k != "samples"}
  print(json.dumps(brief, indent=1), file=sys.stderr)


def _hydra_main():
  import hydra
  from omegaconf import OmegaConf

  config_lib.register_configs()

  @hydra.main(version_base=None, config_path=_config_path(), config_name="sample")
  def main(hydra_cfg) -> None:
    import absl.logging
    absl.logging.set_verbosity(absl.logging.WARNING)
    try:
      cfg = OmegaConf.to_object(hydra_cfg)
      config_lib.validate(cfg)
    except Exception as e:
      raise SystemExit(f"mdlm.sample: invalid config: {e}")
    from mdlm.checkpointing import CheckpointError
    try:
      summary = run(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # refused: a message, no trace
      raise SystemExit(f"mdlm.sample: {e}")
    _print(summary, cfg.print_samples)

  main()


def _config_path() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


if __name__ == "__main__":
  _hydra_main()
