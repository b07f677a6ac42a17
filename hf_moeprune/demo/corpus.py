"""A two-domain text corpus that is already on every machine: the Python standard library.

The ``code`` domain is the library's source with its docstrings cut out; the ``prose`` domain is those
docstrings (module, class and function), extracted with :mod:`ast`. Nothing is downloaded, the result does
not depend on the order in which the filesystem lists files, and the train/validation split is made per
file from a hash of its relative path, so no file contributes text to both splits.

The built corpus is cached under :func:`cache_root` (``$HF_MOEPRUNE_CACHE``, default
``~/.cache/hf_moeprune``), keyed by the Python version and a hash of the sources and the config. Every cached
artifact of the demo (corpus, tokenizer, base model) goes through :func:`cached_build`, which writes into a
temporary folder and renames it into place, so an interrupted build never leaves a half-written cache entry.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from hf_moeprune.utils import atomic_output_dir

logger = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("code", "prose")
SPLITS: tuple[str, ...] = ("train", "validation")
# Bump when the extraction or the on-disk layout changes, so old cache entries are not reused.
CORPUS_FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Folders holding tests, test data, third-party packages or generated tables rather than library code.
# `encodings` is mostly 256-entry codec tables and `pydoc_data` one giant string: neither reads like code.
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)
_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo's cache folder: ``cache_dir``, else ``$HF_MOEPRUNE_CACHE``, else ``~/.cache/hf_moeprune``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HF_MOEPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hf_moeprune"


def cached_build(path: Path, build: Callable[[Path], None], marker: str = MANIFEST) -> bool:
    """Make sure ``path`` holds a complete build; return True when this call had to build it.

    ``build(tmp)`` writes everything into ``tmp`` and must write ``marker`` last. ``tmp`` only becomes
    ``path`` (one rename) when ``build`` returns, so a crash or Ctrl-C leaves no entry at all. A folder
    without ``marker`` (left by something else) is rebuilt.
    """
    if (path / marker).is_file():
        return False
    with atomic_output_dir(path, overwrite=True) as tmp:
        build(tmp)
        if not (tmp / marker).is_file():
            raise RuntimeError(f"cache build for {str(path)!r} did not write its marker file {marker!r}")
    return True


def config_hash(*parts: object, length: int = 16) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses are turned into dicts)."""
    norm = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _unit_hash(salt: str, rel_path: str) -> float:
    """A number in [0, 1) that depends only on ``rel_path`` (and ``salt``), the same on every machine."""
    digest = hashlib.sha256(f"{salt}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class CorpusConfig:
    """What goes into the corpus. The defaults build in a few seconds and give ~1.5 M tokens."""

    source_dir: str | None = field(
        default=None,
        metadata={"help": "folder of .py files to read; default: the running interpreter's standard library"},
    )
    max_files: int | None = field(default=None, metadata={"help": "use at most this many files (None: all)"})
    max_code_chars: int = field(
        default=3_000_000, metadata={"help": "stop adding code once this many characters are collected"}
    )
    max_prose_chars: int = field(
        default=3_000_000, metadata={"help": "stop adding docstrings once this many characters are collected"}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "share of files (by path hash) held out for validation"}
    )
    mix_seed: int = field(default=0, metadata={"help": "seed of the shuffle that interleaves the two domains"})

    def __post_init__(self):
        if self.max_files is not None and self.max_files < 2:
            raise ValueError(f"max_files={self.max_files} must be None or >= 2 (one train and one validation file)")
        for name in ("max_code_chars", "max_prose_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number of characters")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be strictly between 0 and 1")
        if self.source_dir is not None and not Path(self.source_dir).is_dir():
            raise ValueError(f"source_dir={self.source_dir!r} is not a folder")

    def resolved_source_dir(self) -> Path:
        return Path(self.source_dir) if self.source_dir is not None else Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Corpus:
    """The built corpus: one ``DatasetDict`` (train/validation) per domain plus ``mixed`` (both, shuffled).

    Rows have ``text``, ``path`` (relative to the source folder) and ``domain``. ``built`` is True when this
    call built the corpus and False when it came from the cache. ``manifest`` lists the files of every split
    and the character counts.
    """

    path: Path
    fingerprint: str
    code: DatasetDict
    prose: DatasetDict
    mixed: DatasetDict
    built: bool
    manifest: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, domain: str) -> DatasetDict:
        if domain not in (*DOMAINS, "mixed"):
            raise ValueError(f"unknown corpus domain {domain!r}; known: {[*DOMAINS, 'mixed']}")
        return getattr(self, domain)


# -- extraction (pure) -------------------------------------------------------------------------------------


def list_source_files(source_dir: Path) -> list[str]:
    """Relative paths (POSIX, sorted) of the ``.py`` files under ``source_dir`` outside skipped folders."""
    rel_paths = []
    for path in source_dir.rglob("*.py"):
        rel = path.relative_to(source_dir)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        if path.is_file():
            rel_paths.append(rel.as_posix())
    return sorted(rel_paths)


def split_source(source: str) -> tuple[str, list[str]]:
    """Split Python ``source`` into (code without docstrings, docstrings in source order).

    A docstring sharing a line with other code (``def f(): "doc"``) is left in the code but still returned.
    A body that held only a docstring gets ``...`` so the code still parses. Raises SyntaxError on bad source.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    found = []  # (first line, last line, replacement or None to keep, docstring)
    for node in ast.walk(tree):
        if not isinstance(node, _DOC_OWNERS):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc is None:
            continue
        expr = node.body[0]
        first, last = expr.lineno - 1, expr.end_lineno - 1
        # ast offsets count UTF-8 bytes, not characters
        before = lines[first].encode()[: expr.col_offset].decode(errors="replace")
        after = lines[last].encode()[expr.end_col_offset :].decode(errors="replace").strip()
        alone = not before.strip() and (not after or after.startswith("#"))
        replacement = None
        if alone:
            only_statement = len(node.body) == 1 and not isinstance(node, ast.Module)
            replacement = f"{before}...\n" if only_statement else ""
        found.append((first, last, replacement, doc))
    found.sort(key=lambda item: item[0])
    out, cursor = [], 0
    for first, last, replacement, _ in found:
        if replacement is None:
            continue
        out.extend(lines[cursor:first])
        out.append(replacement)
        cursor = last + 1
    out.extend(lines[cursor:])
    return "".join(out), [doc for *_, doc in found if doc.strip()]


def assign_split(rel_path: str, validation_fraction: float) -> str:
    """``"validation"`` for a fixed share of paths, chosen by a hash of the path alone."""
    return "validation" if _unit_hash("split", rel_path) < validation_fraction else "train"


def select_rows(sources: Iterable[tuple[str, str]], config: CorpusConfig) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Turn ``(rel_path, source)`` pairs into rows per domain and split, honouring the config's caps.

    Files are visited in an order fixed by a hash of their path (not alphabetical, so a cap samples the whole
    library rather than its first packages), and every file goes to one split only.
    """
    rows: dict[str, dict[str, list[dict[str, str]]]] = {d: {s: [] for s in SPLITS} for d in DOMAINS}
    ordered = sorted(sources, key=lambda item: (_unit_hash("order", item[0]), item[0]))
    if config.max_files is not None:
        ordered = ordered[: config.max_files]
    splits = {rel: assign_split(rel, config.validation_fraction) for rel, _ in ordered}
    if ordered and "validation" not in splits.values():
        # a small max_files can miss the hash window: hold out the file closest to it
        splits[min(splits, key=lambda rel: _unit_hash("split", rel))] = "validation"
    if len(ordered) > 1 and "train" not in splits.values():
        splits[max(splits, key=lambda rel: _unit_hash("split", rel))] = "train"
    caps = {"code": config.max_code_chars, "prose": config.max_prose_chars}
    used = {"code": 0, "prose": 0}
    for rel, source in ordered:
        try:
            code, docs = split_source(source)
            ast.parse(code)
        except (SyntaxError, ValueError) as exc:
            logger.debug("skipping %s: %s", rel, exc)
            continue
        texts = {"code": code.strip("\n") + "\n" if code.strip() else "", "prose": "\n\n".join(docs)}
        for domain in DOMAINS:
            text = texts[domain]
            if text and used[domain] < caps[domain]:
                rows[domain][splits[rel]].append({"text": text, "path": rel, "domain": domain})
                used[domain] += len(text)
    return rows


def corpus_fingerprint(rows: dict[str, dict[str, list[dict[str, str]]]]) -> str:
    """sha256 of every row (domain, split, path, text) in order: equal fingerprints mean equal corpora."""
    digest = hashlib.sha256()
    for domain in sorted(rows):
        for split in sorted(rows[domain]):
            for row in rows[domain][split]:
                for part in (domain, split, row["path"], row["text"]):
                    digest.update(part.encode())
                    digest.update(b"\0")
    return digest.hexdigest()


# -- building and caching ----------------------------------------------------------------------------------


def _read_sources(source_dir: Path, rel_paths: list[str]) -> tuple[list[tuple[str, str]], str]:
    """Read the files as UTF-8 (skipping those that are not) and hash their bytes."""
    digest = hashlib.sha256()
    sources = []
    for rel in tqdm(rel_paths, desc="reading sources", unit="file", leave=False):
        raw = (source_dir / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        try:
            sources.append((rel, raw.decode("utf-8")))
        except UnicodeDecodeError:
            logger.debug("skipping %s: not UTF-8", rel)
    return sources, digest.hexdigest()


def _to_dataset_dict(rows_by_split: dict[str, list[dict[str, str]]]) -> DatasetDict:
    columns = ("text", "path", "domain")
    return DatasetDict(
        {split: Dataset.from_dict({c: [r[c] for r in rows] for c in columns}) for split, rows in rows_by_split.items()}
    )


def _mix(code: DatasetDict, prose: DatasetDict, seed: int) -> DatasetDict:
    return DatasetDict(
        {
            split: concatenate_datasets([code[split], prose[split]]).shuffle(seed=seed).flatten_indices()
            for split in SPLITS
        }
    )


def build_corpus(
    cache_dir: str | os.PathLike | None = None, max_files: int | None = None, config: CorpusConfig | None = None
) -> Corpus:
    """Build (or load from the cache) the stdlib corpus. ``max_files`` overrides ``config.max_files``."""
    config = config or CorpusConfig()
    if max_files is not None:
        config = dataclasses.replace(config, max_files=max_files)
    source_dir = config.resolved_source_dir()
    rel_paths = list_source_files(source_dir)
    if not rel_paths:
        raise ValueError(f"no .py files found under {str(source_dir)!r}")
    sources, source_hash = _read_sources(source_dir, rel_paths)
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    # source_dir itself is not part of the key: the same files elsewhere give the same corpus
    key_config = dataclasses.replace(config, source_dir=None)
    key = config_hash(CORPUS_FORMAT_VERSION, python, source_hash, key_config)
    path = cache_root(cache_dir) / "demo" / f"corpus-{python}-{key}"

    def build(tmp: Path) -> None:
        rows = select_rows(sources, config)
        for domain in DOMAINS:
            if not rows[domain]["train"] or not rows[domain]["validation"]:
                sizes = {s: len(r) for s, r in rows[domain].items()}
                raise ValueError(
                    f"corpus domain {domain!r} has an empty split {sizes} with max_files={config.max_files}; "
                    "use more files"
                )
        datasets = {domain: _to_dataset_dict(rows[domain]) for domain in DOMAINS}
        datasets["mixed"] = _mix(datasets["code"], datasets["prose"], config.mix_seed)
        for name, dataset_dict in datasets.items():
            dataset_dict.save_to_disk(str(tmp / name))
        manifest = {
            "format_version": CORPUS_FORMAT_VERSION,
            "python": sys.version.split()[0],
            "source_dir": str(source_dir),
            "source_hash": source_hash,
            "config": dataclasses.asdict(key_config),
            "fingerprint": corpus_fingerprint(rows),
            "files": {d: {s: [r["path"] for r in rows[d][s]] for s in SPLITS} for d in DOMAINS},
            "chars": {d: {s: sum(len(r["text"]) for r in rows[d][s]) for s in SPLITS} for d in DOMAINS},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    built = cached_build(path, build)
    logger.info("%s corpus at %s", "built" if built else "loaded cached", path)
    manifest = json.loads((path / MANIFEST).read_text())
    # in memory: later .map() calls must not write cache files into the shared cache folder
    loaded = {name: load_from_disk(str(path / name), keep_in_memory=True) for name in (*DOMAINS, "mixed")}
    return Corpus(path=path, fingerprint=manifest["fingerprint"], built=built, manifest=manifest, **loaded)
