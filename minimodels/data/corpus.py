"""Text sources: every source becomes a split `{"train": [doc, ...], "val": [doc, ...]}` of documents.

`data.source` picks one of:

- "stdlib"            the docstrings of this Python's own standard library (the default: no download);
- "stdlib_code"       the source code of that standard library, one document per file (~11 MB: six times the
                      docstrings, for a model that should not see its data many times over);
- a generated source  a name in GENERATED (e.g. the synthetic knowledge base "kb"): documents made by our
                      own code, deterministic, with a train/val split of the generator's choosing;
- a .txt/.md file     one document per paragraph (paragraphs are separated by one or more blank lines);
- a .json file        a list of strings, or a list of records holding the text in `data.text_field`;
- a .jsonl file       one string or one record per line;
- a folder            every .txt/.md/.json/.jsonl file inside it, recursively, in sorted order;
- anything else       the name of a Hugging Face dataset, loaded with `datasets.load_dataset` (needs
                      the dataset to be in the local cache, or network access to the hub).

The split is deterministic and never changes between runs: with several source files, whole files go
to validation (so no file is in both splits); with a single file, whole documents do. A file or
document goes to validation when a stable hash of its name (or index) falls below `data.val_fraction`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
import time
from pathlib import Path

from minimodels.data.config import DataConfig


class DataError(ValueError):
    """A problem with the data section; the message is one line naming the key and the file."""


TEXT_SUFFIXES = (".txt", ".md", ".json", ".jsonl")

# data.source name -> function(cfg: DataConfig) -> {"train": [...], "val": [...]}; filled by minimodels/data/__init__.py
GENERATED: dict = {}


# --------------------------------------------------------------------------- the split rule


def in_val(key: str, val_fraction: float) -> bool:
    """True if `key` (a relative path or a document index) belongs to the validation split.

    md5 (not Python's `hash`, which is salted per process) maps the key to a number in [0, 1)."""
    h = int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def split_records(records: list[dict], val_fraction: float) -> dict[str, list[dict]]:
    """Split records {"text", "path"} by source file; fall back to a split by document index when
    there is only one file, or when the file split leaves one side empty."""
    paths = sorted({r["path"] for r in records})
    if len(paths) > 1:
        val_paths = {p for p in paths if in_val(p, val_fraction)}
        if 0 < len(val_paths) < len(paths):
            return {
                "train": [r for r in records if r["path"] not in val_paths],
                "val": [r for r in records if r["path"] in val_paths],
            }
    flags = [in_val(str(i), val_fraction) for i in range(len(records))]
    if not any(flags):  # a tiny corpus: hold out at least the last document
        flags[-1] = True
    return {
        "train": [r for r, v in zip(records, flags) if not v],
        "val": [r for r, v in zip(records, flags) if v],
    }


def texts(split: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {name: [r["text"] for r in recs] for name, recs in split.items()}


# --------------------------------------------------------------------------- the stdlib: docstrings, source

# folders of the stdlib that hold tests or third-party code, not documentation
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "testdata"}


def cache_dir() -> Path:
    return Path(os.environ.get("MINIMODELS_CACHE") or Path.home() / ".cache" / "minimodels")


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's folder and its .py files outside SKIP_DIRS, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def extract_docstrings(path: Path) -> list[tuple[str, str]]:
    """(name, docstring) of the module and of every class / function / async function in it, in source
    order. name is the qualified name inside the module ("JSONDecoder.decode"), "" for the module itself.

    Raises SyntaxError / ValueError / UnicodeDecodeError for files that do not parse."""
    tree = ast.parse(path.read_bytes())  # bytes: `ast` honours the file's own coding declaration
    found = []  # (line, name, docstring)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found.append((child.lineno, name, ast.get_docstring(child)))  # also removes the indentation
                visit(child, name + ".")
            else:  # definitions inside if/try/with blocks still belong to the enclosing scope
                visit(child, prefix)

    found.append((0, "", ast.get_docstring(tree)))
    visit(tree, "")
    found.sort(key=lambda item: item[0])  # file order
    return [(name, doc) for _, name, doc in found if doc and doc.strip()]


def stdlib_records() -> list[dict]:
    """Every docstring of the running interpreter's stdlib as
    {"text": docstring, "path": "json/decoder.py", "name": "JSONDecoder.decode"} (name "" for a module).

    The first call parses ~730 files (a few seconds) and caches the result as JSON in
    $MINIMODELS_CACHE (default ~/.cache/minimodels/), one file per Python version."""
    version = f"{platform.python_implementation().lower()}-{platform.python_version()}"
    cache = cache_dir() / f"stdlib-docstrings-v2-{version}.json"  # v2: records carry "name"
    if cache.is_file():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below

    root, files = stdlib_files()
    records = []
    for path in files:
        try:
            docs = extract_docstrings(path)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue  # e.g. Python 2 leftovers: not our documentation
        rel = path.relative_to(root).as_posix()
        records += [{"text": d, "path": rel, "name": name} for name, d in docs]

    # write to a temporary file, then rename: a crash or a parallel run never leaves half a file
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, cache)
    return records


def stdlib_code(val_fraction: float = 0.1) -> dict[str, list[str]]:
    """data.source: stdlib_code — every stdlib .py file's text as one document, split by file. A text that more
    than one file holds (a few stubs and examples) is kept once, so that no document is in both splits."""
    root, files = stdlib_files()
    records = {}  # text -> its first file's record
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            records.setdefault(text, {"text": text, "path": p.relative_to(root).as_posix()})
    return texts(split_records(list(records.values()), val_fraction))


def stdlib_docstrings(val_fraction: float = 0.1) -> dict[str, list[str]]:
    """The default corpus: stdlib docstrings (~1.8 MB), split by source file."""
    return texts(split_records(stdlib_records(), val_fraction))


# --------------------------------------------------------------------------- local files


def read_file(path: Path, text_field: str) -> list[str]:
    """The documents of one .txt/.md/.json/.jsonl file (empty or blank documents dropped)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.source: cannot read {path} as UTF-8 text: {e}") from None
    if path.suffix in (".txt", ".md"):
        docs = [p.strip("\n") for p in split_paragraphs(raw)]
    elif path.suffix == ".json":
        try:
            items = json.loads(raw)
        except ValueError as e:
            raise DataError(f"data.source: {path} is not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise DataError(f"data.source: {path} must hold a JSON list of strings or records, got {type(items).__name__}")
        docs = [record_text(item, text_field, f"item {i} of {path}") for i, item in enumerate(items)]
    elif path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise DataError(f"data.source: line {i + 1} of {path} is not valid JSON: {e}") from None
                docs.append(record_text(item, text_field, f"line {i + 1} of {path}"))
    else:
        raise DataError(f"data.source: {path}: unsupported file type (use {', '.join(TEXT_SUFFIXES)} or a folder)")
    return [d for d in docs if d.strip()]


def split_paragraphs(text: str) -> list[str]:
    """Split at blank lines (a line holding only whitespace counts as blank)."""
    paragraphs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("".join(current))
            current = []
    if current:
        paragraphs.append("".join(current))
    return paragraphs


def record_text(item, text_field: str, where: str) -> str:
    """A JSON item is either the text itself or a record {text_field: text, ...}."""
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise DataError(f"data.source: {where} is a {type(item).__name__}, expected a string or a record")
    if text_field not in item:
        raise DataError(f"data.text_field: no field '{text_field}' in {where} (fields: {', '.join(map(str, item))})")
    if not isinstance(item[text_field], str):
        raise DataError(f"data.text_field: field '{text_field}' in {where} is a {type(item[text_field]).__name__}, not text")
    return item[text_field]


def local_corpus(path: Path, text_field: str, val_fraction: float) -> dict[str, list[str]]:
    """A file or a folder of files, split by file (several files) or by document (one file)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data.source: folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
    else:
        files = [path]
    records = []
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        records += [{"text": d, "path": rel} for d in read_file(f, text_field)]
    if len(records) < 2:
        raise DataError(f"data.source: {path} holds {len(records)} document(s); need at least 2 "
                        "(one for training, one for validation; separate paragraphs with a blank line)")
    return texts(split_records(records, val_fraction))


# --------------------------------------------------------------------------- Hugging Face datasets


def hf_corpus(name: str, subset: str | None, text_field: str, val_fraction: float) -> dict[str, list[str]]:
    """A dataset from the Hugging Face hub (or its local cache): its "validation" split if it has
    one, otherwise its "train" split divided by document index."""
    import datasets  # imported here: only this source needs the hub machinery

    try:
        ds = datasets.load_dataset(name, subset)
    except Exception as e:  # offline, unknown name, missing subset, ...: all end the same way
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data.source: '{name}' is not a local file or folder, and loading it as a "
                        f"Hugging Face dataset (subset {subset!r}) failed: {msg}") from None
    if "train" not in ds:
        raise DataError(f"data.source: Hugging Face dataset '{name}' has no 'train' split (splits: {', '.join(ds)})")
    if text_field not in ds["train"].column_names:
        raise DataError(f"data.text_field: no column '{text_field}' in Hugging Face dataset '{name}' "
                        f"(columns: {', '.join(ds['train'].column_names)})")

    def docs(split: str) -> list[str]:
        return [t for t in ds[split][text_field] if t and t.strip()]

    if "validation" in ds:
        return {"train": docs("train"), "val": docs("validation")}
    records = [{"text": t, "path": name} for t in docs("train")]
    return texts(split_records(records, val_fraction)) if records else {"train": [], "val": []}


# --------------------------------------------------------------------------- dispatch


def load_corpus(cfg: DataConfig) -> dict[str, list[str]]:
    """Documents of `cfg.source`, split into {"train": [...], "val": [...]}; both are non-empty."""
    if cfg.source == "stdlib":
        split = stdlib_docstrings(cfg.val_fraction)
    elif cfg.source == "stdlib_code":
        split = stdlib_code(cfg.val_fraction)
    elif cfg.source in GENERATED:
        split = GENERATED[cfg.source](cfg)
    elif Path(cfg.source).expanduser().exists():
        split = local_corpus(Path(cfg.source).expanduser(), cfg.text_field, cfg.val_fraction)
    elif cfg.source.endswith(TEXT_SUFFIXES) or cfg.source.startswith(("/", ".", "~")):
        # looks like a path, not a dataset name: a typo should not send us to the hub
        raise DataError(f"data.source: file or folder '{cfg.source}' not found")
    else:
        split = hf_corpus(cfg.source, cfg.hf_subset, cfg.text_field, cfg.val_fraction)
    for name in ("train", "val"):
        if not split[name]:
            raise DataError(f"data.source: '{cfg.source}' gave no {name} documents")
    return split


if __name__ == "__main__":  # python -m minimodels.data.corpus: time the extraction and print sizes
    t0 = time.perf_counter()
    corpus = stdlib_docstrings()
    print(f"{time.perf_counter() - t0:.2f} s;", {k: (len(v), sum(map(len, v))) for k, v in corpus.items()})
