"""`python -m mdlm.sample` as typed in a shell: literal template / prompt text, output files that
are never overwritten, and the warning for settings whose samples are identical by construction."""

import json
import os
import random

import pytest

from mdlm import sample
from mdlm.sampling import config as config_lib

TEXTS = ["The [MASK*5] of Denmark", "To be, or not", 'He said "a\\b" [MASK*3] it\'s', "end\\",
         "\\\\", '"', "x ${y} z", "\\${y}", "a\\\\${y}", "a=b,c [d] {e} (f) ~g +h @i %j",
         "two\nlines\t", " lead", "null ", "'single'x", '"a" b "c"', "日本 [MASK]"]


def _hydra_reads(arg: str) -> str:
  """What Hydra's override parser, then OmegaConf, make of one command-line override."""
  from hydra.core.override_parser.overrides_parser import OverridesParser
  from omegaconf import OmegaConf
  value = OverridesParser.create().parse_override(arg).value()
  return OmegaConf.create({"v": value}).v


def test_text_overrides_read_back_as_the_text_typed():
  """Each text, as one argv element without quotes (what a shell passes on for
  template="..."), reads back unchanged through Hydra and OmegaConf; random texts over the
  characters that mean something to either included. Quoted Hydra strings, null, the empty
  value and other overrides are left alone."""
  rng = random.Random(0)
  alphabet = ['\\', '"', "'", "$", "{", "}", "[", "]", ",", "=", " ", "a", "\n", "*", "MASK"]
  texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
                   for _ in range(300)]
  for key in ("template", "prompt", "+template", "++prompt"):
    for text in texts:
      (arg,) = sample.quote_text_overrides([f"{key}={text}"])
      assert arg.startswith(f"{key}=")
      assert _hydra_reads(arg.lstrip("+")) == text, (text, arg)
  kept = ['template="The [MASK*5] of Denmark"', "prompt='To be'", "template=null", "prompt=",
          "run=x", "sampler.steps=4", "output=a,b", "templates=[1]"]
  assert sample.quote_text_overrides(kept) == kept


def test_the_documented_command_composes_the_same_config_either_way():
  """The real Hydra composition of configs/sample.yaml: the shell form and the quoted form give
  the same template; without the rewrite Hydra refuses the shell form."""
  from hydra import compose, initialize_config_dir
  from hydra.errors import OverrideParseException
  from omegaconf import OmegaConf
  config_lib.register_configs()
  shell = ["run=r", "sampler=confidence", "template=The [MASK*5] of Denmark"]
  quoted = ["run=r", "sampler=confidence", 'template="The [MASK*5] of Denmark"']
  with initialize_config_dir(config_dir=sample._config_path(), version_base=None):
    for args in (shell, quoted):
      cfg = OmegaConf.to_object(compose("sample", overrides=sample.quote_text_overrides(args)))
      assert cfg.template == "The [MASK*5] of Denmark" and cfg.sampler.name == "confidence"
    with pytest.raises(OverrideParseException, match="mismatched input '\\['"):
      compose("sample", overrides=shell)


def test_cli_takes_the_shell_form_numbers_outputs_and_warns(tiny_run):
  """The documented command with the argv a shell produces, then the quoted form: both fill
  the template; the second run writes a numbered file beside the first (never over it); at
  temperature 0 (LLaDA's greedy default) stderr warns that the samples are identical, which
  they are, and the summary says so; JAX's backend-probing INFO line is not printed."""
  from tests.helpers import run_python
  common = [f"run={tiny_run}", "sampler=confidence", "num_samples=2", "batch_size=2",
            "sampler.steps=4", "length=32", "seed=11", "progress=false"]
  probe = {"JAX_PLATFORMS": ""}  # JAX probes every backend, TPU included, as it does by default
  shell = run_python(["-m", "mdlm.sample", *common, "template=The [MASK*5] of Denmark"], probe)
  assert shell.returncode == 0, shell.stderr[-3000:]
  quoted = run_python(["-m", "mdlm.sample", *common, 'template="The [MASK*5] of Denmark"'],
                      probe)
  assert quoted.returncode == 0, quoted.stderr[-3000:]
  first = os.path.join(tiny_run, "samples", "confidence-seed11.jsonl")
  second = os.path.join(tiny_run, "samples", "confidence-seed11-1.jsonl")
  rows = []
  for proc, path in ((shell, first), (quoted, second)):
    assert f"wrote 2 samples to {path}" in proc.stderr
    assert "Unable to initialize backend" not in proc.stdout + proc.stderr
    assert "samples from this one starting sequence will be identical" in proc.stderr
    assert "LLaDA's default" in proc.stderr and "sampler.temperature" in proc.stderr
    assert json.load(open(path + ".summary.json"))["identical_by_construction"] is True
    rows.append([json.loads(line) for line in open(path)])
  for row in rows[0] + rows[1]:
    assert row["text"].startswith("The ") and "of Denmark" in row["text"]
    assert len(row["tokens"]) == 32 and len(row["fills"]) == 2
  assert rows[0] == rows[1]  # same template, seed and deterministic sampler
  assert rows[0][0]["tokens"] == rows[0][1]["tokens"]  # identical by construction


def _cfg(run, **kw):
  sampler = config_lib.SamplerConfig(**kw.pop("sampler", {}))
  return config_lib.SampleConfig(run=run, sampler=sampler, num_samples=2, batch_size=2,
                                 length=32, print_samples=False, progress=False, **kw)


def test_an_existing_output_is_refused_before_loading(tiny_run, tmp_path, monkeypatch):
  """An explicit output= that exists (or whose summary does) is refused in one line naming the
  file and the fix, before any model loads; the file is untouched."""
  def no_load(cfg):
    raise AssertionError("the model was loaded")
  monkeypatch.setattr(sample, "_load", no_load)
  out = tmp_path / "s.jsonl"
  for existing in (out, tmp_path / "s.jsonl.summary.json"):
    existing.write_text("keep\n")
    with pytest.raises(ValueError) as e:
      sample.run(_cfg(tiny_run, output=str(out)))
    message = str(e.value)
    assert "\n" not in message and str(existing) in message and "another output=" in message
    assert existing.read_text() == "keep\n"
    existing.unlink()
  with pytest.raises(AssertionError, match="the model was loaded"):  # the name was free
    sample.run(_cfg(tiny_run, output=str(out)))
  assert not out.exists()  # the reserved name is released when sampling fails


@pytest.mark.parametrize("sampler,identical", [
    ({"name": "confidence", "temperature": 0.0}, True),
    ({"name": "confidence", "temperature": 0.0, "threshold": 0.9}, True),
    ({"name": "confidence", "temperature": 0.0, "remasking": "random"}, False),
    ({"name": "confidence", "temperature": 1.0}, False),
    ({"name": "semi_ar", "inner": "confidence", "temperature": 0.0}, True),
    ({"name": "semi_ar", "inner": "ancestral", "temperature": 0.0}, False),
    ({"name": "ancestral", "temperature": 0.0}, False),  # the unmasking order is random
    ({"name": "maria", "temperature": 0.0}, True),
    ({"name": "maria", "temperature": 1.0}, False),
])
def test_identical_by_construction(sampler, identical):
  assert sample.identical_by_construction(_cfg("r", sampler=sampler)) is identical


def test_the_confidence_presets_are_greedy_as_llada():
  """The documented choice: the confidence presets keep temperature 0 (LLaDA's default)."""
  from omegaconf import OmegaConf
  for name in ("confidence", "fast_dllm"):
    preset = OmegaConf.load(os.path.join(sample._config_path(), "sampler", f"{name}.yaml"))
    assert preset.temperature == 0.0 and preset.get("remasking", "low_confidence") == \
        "low_confidence"
