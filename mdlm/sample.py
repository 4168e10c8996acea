"""Sampling CLI: `python -m mdlm.sample run=<run dir or checkpoint> [hydra overrides]`.

  python -m mdlm.sample run=runs/x num_samples=8                         # MDLM ancestral, cached
  python -m mdlm.sample run=runs/x sampler=confidence sampler.steps=64 sampler.block_length=32
  python -m mdlm.sample run=runs/x sampler=fast_dllm
  python -m mdlm.sample run=runs/x sampler=semi_ar length=1024 sampler.stride=64
  python -m mdlm.sample run=runs/x prompt="To be, or not to be" length=128
  python -m mdlm.sample run=runs/x template="The [MASK*5] of Denmark" sampler.steps=100
  python -m mdlm.sample run=runs/x evaluator=runs/ar      # + generative perplexity
  python -m mdlm.sample run=runs/maria sampler=maria template="The [MASK*5] of Denmark"
      # a MARIA run (experiment=maria): denoiser pass + KV-cached AR decoding through the head
  python -m mdlm.sample run=runs/x mesh=fsdp batch_size=64   # parameters and batch over devices
  python -m mdlm.sample run=runs/bd3lm sampler=block length=1024
      # a bd3lm run: block by block with an exact KV cache, each sample stopping at its EOS

The text of `template=` and `prompt=` is taken literally, as the shell delivers it (brackets,
commas, quotes and backslashes included); a value already written as a quoted Hydra string
('template="..."') is left to Hydra.

Writes the text of each sample to stdout and one JSON object per sample to a JSON Lines file
(`output=`, default <run>/samples/<sampler>-seed<seed>.jsonl, then -1, -2, ... once that exists);
a summary (NFE, its full-pass equivalent for cached samplers, unigram entropy, generative
perplexity with an evaluator) goes to stderr and to <output>.summary.json. An existing file is
never overwritten: an explicit output= that exists is refused before anything loads. Settings are
the typed dataclasses of mdlm/sampling/config.py; presets live in configs/sampler/.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
import time

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mdlm import cli, objectives, sampling, sharding
from mdlm.checkpointing import CheckpointError
from mdlm.rundir import RunDir, load_run
from mdlm.sampling import config as config_lib
from mdlm.sampling import metrics, text


def _starting_sequence(cfg: config_lib.SampleConfig, tokenizer, mask_id: int, length: int):
  """(xt [length] with mask_id where to fill, marker spans or None)."""
  if cfg.template:
    parsed = text.parse_template(cfg.template, tokenizer, mask_id, add_bos=cfg.add_bos,
                                 length=length if cfg.length is not None else None)
    return parsed.tokens, parsed.spans
  if cfg.prompt:
    return text.prompt_tokens(tokenizer, cfg.prompt, length, mask_id, add_bos=cfg.add_bos), None
  if cfg.sampler.name == "block":  # a document: BOS, text, and the EOS the sample may stop at
    return text.prompt_tokens(tokenizer, None, length, mask_id, add_bos=cfg.add_bos), None
  return np.full((length,), mask_id, np.int32), None


def _load(cfg: config_lib.SampleConfig):
  """(loaded run, what run_sampler samples with: a denoiser, or the MARIA head for maria).

  sampler=maria needs a run whose objective trains a head over given runs (objective=maria) and
  any other sampler a run that is not one: a mismatch is refused before any weights load."""
  run, _ = RunDir.find(cfg.run)
  trained = run.load_config().objective
  head_run = bool(objectives.get(trained.name).given_runs(trained))
  if cfg.sampler.name == "maria" and not head_run:
    raise ValueError(
        f"sampler=maria needs a MARIA run (python -m mdlm.train experiment=maria "
        f"objective.denoiser_run=... objective.ar_run=...); {run.path} was trained with "
        f"objective={trained.name}. Pass run=<a MARIA run directory>, or choose another "
        "sampler (e.g. sampler=ancestral).")
  if head_run and cfg.sampler.name != "maria":
    raise ValueError(
        f"{run.path} is a MARIA run (objective={trained.name}): sample from it with "
        "sampler=maria, or pass the denoiser run it was built on with this sampler.")
  loaded = load_run(cfg.run, ema=cfg.ema, step=cfg.step)
  if head_run:
    return loaded, loaded.model
  return loaded, sampling.denoiser_from_model(loaded.model, loaded.config.noise.build())


def _mesh(cfg: config_lib.SampleConfig):
  """The device mesh (None on one device), checked against batch_size before anything loads."""
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


def identical_by_construction(cfg: config_lib.SampleConfig) -> bool:
  """Whether every sample of this setting is the same sequence, whatever the seed: the CLI
  starts all rows from one sequence, and at temperature 0 the confidence sampler with
  low-confidence remasking (argmax predictions, the most confident committed) and MARIA's greedy
  decoding use no random numbers."""
  s = cfg.sampler
  inner = s.inner if s.name == "semi_ar" else s.name
  if s.temperature != 0.0:
    return False
  return (inner == "confidence" and s.remasking == "low_confidence") or inner == "maria"


def _warn_if_identical(cfg: config_lib.SampleConfig) -> bool:
  """Says on stderr when more than one sample is asked of a deterministic setting."""
  identical = identical_by_construction(cfg)
  if identical and cfg.num_samples > 1:
    if cfg.sampler.name == "maria":
      what = "sampler=maria with sampler.temperature=0 decodes greedily"
      fix = "set sampler.temperature (e.g. 1.0)"
    else:
      what = ("sampler.temperature=0 with sampler.remasking=low_confidence is deterministic "
              "(argmax predictions, most confident first: LLaDA's default, greedy)")
      fix = "set sampler.temperature (e.g. 1.0) or sampler.remasking=random"
    print(f"mdlm.sample: warning: {what}, so all {cfg.num_samples} samples from this one "
          f"starting sequence will be identical; for distinct samples {fix}, or ask for "
          "num_samples=1.", file=sys.stderr)
  return identical


def _reserve_output(cfg: config_lib.SampleConfig) -> str:
  """Creates the empty JSON Lines file the samples go to, exclusively, before anything loads:
  samples never overwrite a file. The default is numbered past existing ones (a concurrent run
  takes the next number); an explicit output= that exists is refused."""
  if cfg.output:
    for path in (cfg.output, cfg.output + ".summary.json"):
      if os.path.exists(path):
        raise ValueError(f"{path} exists and samples never overwrite a file: pass another "
                         "output=<new .jsonl path>, or leave output unset to number the files "
                         "under <run>/samples.")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    with open(cfg.output, "x"):
      pass
    return cfg.output
  run, _ = RunDir.find(cfg.run)
  base = os.path.join(run.samples_dir, f"{cfg.sampler.name}-seed{cfg.seed}")
  os.makedirs(os.path.dirname(base), exist_ok=True)
  for n in itertools.count():
    path = f"{base}-{n}.jsonl" if n else f"{base}.jsonl"
    if os.path.exists(path + ".summary.json"):
      continue
    try:
      with open(path, "x"):
        return path
    except FileExistsError:
      continue


def run(cfg: config_lib.SampleConfig) -> dict:
  """Samples, writes the JSON Lines file and returns the summary."""
  config_lib.validate(cfg)
  identical = _warn_if_identical(cfg)
  mesh = _mesh(cfg)
  output = _reserve_output(cfg)
  try:
    samples, summary = _sample(cfg, mesh)
  except BaseException:
    if os.path.getsize(output) == 0:  # release the reserved name
      os.remove(output)
    raise
  summary["identical_by_construction"] = identical
  with open(output, "w") as f:
    for item in samples:
      f.write(json.dumps({**item, "sampler": cfg.sampler.name, "step": summary["step"]}) + "\n")
  with open(output + ".summary.json", "x") as f:
    json.dump(summary, f, indent=1)
  summary["output"] = output
  summary["samples"] = samples
  return summary


def _sample(cfg: config_lib.SampleConfig, mesh) -> tuple[list[dict], dict]:
  """Loads the run and samples: (one dict per sample, the summary without its output)."""
  s = cfg.sampler
  loaded, denoise = _load(cfg)
  if mesh is not None:
    denoise = sampling.shard_denoiser(denoise, mesh, cfg.mesh.rules)
  tokenizer, train_cfg = loaded.tokenizer, loaded.config
  model = loaded.model
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
  if s.name == "block":
    settings.update(_block_settings(s, train_cfg, tokenizer))
  if s.name == "semi_ar":
    settings["window"] = min(settings["window"] or model.cfg.max_seq_len, length)
    settings["stride"] = settings["stride"] or max(1, settings["window"] // 2)
  if s.guidance:
    denoise = sampling.guided(denoise, jnp.asarray(xt_L != mask_id), s.guidance)
  t0 = time.time()
  samples, nfe_per_batch, nfe_equiv_per_batch = _sample_batches(cfg, denoise, xt_L, spans,
                                                                settings, tokenizer, mesh)
  specials = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id", -1)}
  token_rows = np.asarray([it["tokens"] for it in samples])
  summary = {
      "run": loaded.run_dir, "step": loaded.step, "sampler": dataclasses.asdict(s),
      "num_samples": len(samples), "length": length, "seed": cfg.seed,
      "nfe_per_batch": nfe_per_batch, "nfe_equiv_per_batch": nfe_equiv_per_batch,
      "seconds": time.time() - t0,
      "unigram_entropy": sampling.unigram_entropy(token_rows, ignore=specials)["mean"],
  }
  if cfg.evaluator:
    summary.update(_gen_ppl(cfg.evaluator, samples, tokenizer))
  return samples, summary


def _block_settings(s: config_lib.SamplerConfig, train_cfg, tokenizer) -> dict:
  """sampler=block: the block size (the run's objective.block_size unless given), the cache's
  context (the training length, in whole blocks) and the EOS to stop at."""
  block_size = s.block_size or getattr(train_cfg.objective, "block_size", None)
  if block_size is None:
    raise ValueError(f"sampler=block needs sampler.block_size: the run was trained with "
                     f"objective={train_cfg.objective.name}, which has no block size (a bd3lm "
                     "run supplies its own).")
  context = s.context or max(train_cfg.data.seq_len // block_size, 1) * block_size
  return {"block_size": int(block_size), "context": int(context),
          "eos_id": int(tokenizer.eos_id) if s.stop_at_eos else None}


def _sample_batches(cfg, denoise, xt_L, spans, settings, tokenizer, mesh):
  """(one dict per sample, mean NFE per batch, mean NFE-equivalent per batch): num_samples rows
  in batches of batch_size. The NFE-equivalent counts a cached call over W of L positions as
  W / L of a full pass (samplers without a cache: the NFE)."""
  s = cfg.sampler
  num_batches = -(-cfg.num_samples // cfg.batch_size)
  key = jax.random.key(cfg.seed)
  bar = None
  if cfg.progress and num_batches > 1:
      bar = tqdm(total=cfg.num_samples, desc=f"sampling ({s.name})", unit="sample", file=sys.stderr)
  samples, nfe_total, equiv_total = [], 0, 0.0
  for b in range(num_batches):
    count = min(cfg.batch_size, cfg.num_samples - b * cfg.batch_size)
    # Every batch has batch_size rows (one compile); the surplus rows of the last are dropped.
    xt = jnp.broadcast_to(jnp.asarray(xt_L), (cfg.batch_size, len(xt_L)))
    if mesh is not None:
      xt = jax.device_put(xt, sharding.batch_sharding(mesh))
    tokens, stats = sampling.run_sampler(jax.random.fold_in(key, b), denoise, xt,
                                         sampler=s.name, **settings)
    nfe_total += int(stats["nfe"])
    # Cached samplers' calls run part of the sequence: their cost in full passes.
    equiv = float(stats.get("nfe_equiv", stats["nfe"]))
    equiv_total += equiv
    lengths = np.asarray(stats.get("length", np.full(len(tokens), len(xt_L))))
    for row, used in zip(np.asarray(tokens)[:count], lengths):
      if used < len(row):  # sampler=block stopped this row at its EOS: padding after it
        row = np.concatenate([row[:used], np.full(len(row) - used, tokenizer.pad_id, row.dtype)])
      item = {"index": len(samples), "text": sampling.decode(tokenizer, row[:used]),
              "tokens": row.tolist(), "nfe": int(stats["nfe"]), "nfe_equiv": equiv}
      if "length" in stats:
        item["length"] = int(used)
      if spans is not None:
        item["fills"] = [tokenizer.decode(row[a:e]) for a, e in spans]
      samples.append(item)
    if bar is not None:
      bar.update(count)
  if bar is not None:
    bar.close()
  return samples, nfe_total / num_batches, equiv_total / num_batches


def _gen_ppl(evaluator: str, samples, tokenizer) -> dict:
  ev = load_run(evaluator)
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
  print(f"mdlm.sample: wrote {summary['num_samples']} samples to {summary['output']} (summary: "
        f"{summary['output']}.summary.json)", file=sys.stderr)


# `template=...` / `prompt=...` (optionally with Hydra's + or ++ prefix), the value to the end.
_TEXT_OVERRIDE = re.compile(r"(\+{0,2}(?:template|prompt))=(.*)\Z", re.S)


def quote_text_overrides(argv: list[str]) -> list[str]:
  """argv with each template= / prompt= value that is not already a quoted Hydra string turned
  into one that reads back as the same text.

  Why: the documented `template="The [MASK*5] of Denmark"` reaches Python without its quotes when
  typed in a shell, and Hydra's override grammar rejects the bare brackets ("mismatched input
  '['"); commas would make a sweep. These values are always text, never Hydra expressions."""
  out = []
  for arg in argv:
    match = _TEXT_OVERRIDE.match(arg)
    if match and not _is_hydra_string(match.group(2)):
      arg = f"{match.group(1)}={hydra_quote(match.group(2))}"
    out.append(arg)
  return out


def _is_hydra_string(value: str) -> bool:
  """A quoted Hydra string ('...' or "..."), or null / empty (Hydra's meanings kept)."""
  if value in ("", "null"):
    return True
  if len(value) < 2 or value[0] not in "\"'" or value[-1] != value[0]:
    return False
  try:
    return isinstance(OverridesParser.create().parse_override(f"x={value}").value(), str)
  except Exception:  # not one quoted string (e.g. "a" b "c"): quote it whole
    return False


def hydra_quote(text: str) -> str:
  """text as a double-quoted Hydra override value that Hydra, then OmegaConf, read back as text.

  OmegaConf: `${` starts an interpolation, `\\${` is a literal one, and backslashes right before
  it pair up. Hydra (inside quotes): a run of backslashes before a quote or the end is halved,
  and `\\"` is a quote; other backslashes are literal."""
  text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
  text = re.sub(r'(\\*)("|\Z)', lambda m: m.group(1) * 2 + ("\\\"" if m.group(2) else ""), text)
  return f'"{text}"'


def _hydra_main():
  config_lib.register_configs()
  cli.register_help_resolver()
  sys.argv[1:] = quote_text_overrides(sys.argv[1:])

  @hydra.main(version_base=None, config_path=_config_path(), config_name="sample")
  def main(hydra_cfg) -> None:
    cli.setup_logging()
    try:
      cfg = OmegaConf.to_object(hydra_cfg)
      config_lib.validate(cfg)
    except Exception as e:
      raise SystemExit(f"mdlm.sample: invalid config: {e}")
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
