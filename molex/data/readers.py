"""Read instruction data from local files, folders or the hub into normalised ``datasets.Dataset`` splits.

The one data reader of molex: :class:`~molex.data.datamodule.InstructionDataModule` and ``molex-fuse``
both read through :func:`read_source`. Sources:

* a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file (returned as the ``train`` split; the
  text formats must be UTF-8, and a file that is not is refused naming it and its first bad byte),
* a folder holding ``train.*`` / ``validation.*`` (or ``val``, ``valid``, ``dev``) / ``test.*`` files,
* a dict ``{"train": path, "validation": path, "test": path}``,
* any other name: a hub dataset, loaded with ``datasets.load_dataset`` (the only case that may download).

Every split comes back normalised: string columns ``instruction``, ``input``, ``output``, ``task`` (and
``choices``, a list of strings, when the data has them), mapped from the data's own column names with
``columns={"instruction": "question", ...}``; ``input`` and ``task`` may be absent from the data.
``columns={"features": ["task", "lang"]}`` also keeps those data columns' values, as strings in that
order, in a list column ``features`` (the feature ids of FLix's ``features`` router).
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from molex.core.sources import looks_like_path

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TASK",
    "FIELDS",
    "FILE_FORMATS",
    "REQUIRED_FIELDS",
    "TEXT_FIELDS",
    "check_columns",
    "check_utf8",
    "drop_empty_outputs",
    "fingerprint",
    "normalise",
    "read_file",
    "read_folder",
    "read_hub",
    "read_source",
    "split_name",
]

#: the fields of a normalised example; instruction and output are required
FIELDS = ("instruction", "input", "output", "task", "choices")
REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("instruction", "input", "output", "task")
#: the task of examples whose data has no task column
DEFAULT_TASK = "default"
#: file extension -> ``datasets`` builder name
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: formats read as text: molex reads them as UTF-8 (parquet is binary)
TEXT_FORMATS = ("json", "csv")
_UTF8_CHUNK = 1 << 20
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def split_name(split: str) -> str:
    """The canonical name (``train`` / ``validation`` / ``test``) of a split name or alias."""
    key = split.lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split name {split!r}; use train, validation (or val/valid/dev) or test")
    return _SPLIT_ALIASES[key]


def fingerprint(*parts: Any) -> str:
    """A ``datasets`` fingerprint for a transform: the same parts give the same cache key."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def check_columns(columns: Mapping[str, Any] | None) -> dict[str, Any]:
    """``columns`` as a dict, after checking that it maps only molex fields (and ``features``, a list)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS) - {"features"})
    if unknown:
        raise ValueError(f"columns maps unknown field(s) {unknown}; molex fields are {list(FIELDS)} and 'features'")
    if "features" in columns:
        features = columns["features"]
        if isinstance(features, str) or not all(isinstance(c, str) for c in features or []):
            raise ValueError(f"columns.features must be a list of column names, e.g. [task, lang]; got {features!r}")
        columns["features"] = list(features)
    return columns


def read_source(
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    columns: Mapping[str, str] | None = None,
    hub_config: str | None = None,
) -> dict[str, datasets.Dataset]:
    """``{split: normalised Dataset}`` from a file, a folder, a ``{split: file}`` dict or a hub name.

    Raises ``ValueError`` (unreadable or wrongly shaped data, unknown split or column names) or
    ``FileNotFoundError`` (a missing file, an empty folder, a hub name the hub cannot provide).
    """
    columns = check_columns(columns)
    if isinstance(source, Mapping):
        splits = {split_name(split): read_file(Path(path).expanduser()) for split, path in source.items()}
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            splits = read_folder(path)
        elif path.exists() or looks_like_path(str(source)):
            splits = {"train": read_file(path)}
        else:
            splits = read_hub(str(source), hub_config)
    output_column = columns.get("output", "output")
    return {
        split: drop_empty_outputs(normalise(ds, split, columns), split, source, output_column)
        for split, ds in splits.items()
    }


def drop_empty_outputs(ds: datasets.Dataset, split: str, source: Any, column: str = "output") -> datasets.Dataset:
    """``ds`` without the examples whose (normalised) ``output`` is empty, their count logged.

    An example without an answer teaches nothing (the loss covers only the answer) and cannot be scored;
    a split left with no example at all is refused.
    """
    if len(ds) == 0:
        return ds
    keep = [i for i, output in enumerate(ds["output"]) if output]
    if len(keep) == len(ds):
        return ds
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"{split} of {dict(source)}"
    if not keep:
        raise ValueError(
            f"every one of the {len(ds)} {split} examples in {where!r} has a null or empty output "
            f"(column {column!r}): molex learns and scores the outputs; fill that column, or map the column "
            "holding the answers with columns={'output': ...}"
        )
    logger.warning(
        "%s: dropped %d of %d examples with a null or empty output (column %r) from %s",
        split, len(ds) - len(keep), len(ds), column, where,
    )  # fmt: skip
    return ds.select(keep, keep_in_memory=True)


def read_file(path: Path) -> datasets.Dataset:
    """One local data file as a ``Dataset``; clear errors for missing, empty or unsupported files."""
    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"unsupported data file {str(path)!r}; use one of {sorted(FILE_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {str(path)!r}")
    raw = path.read_bytes() if builder in TEXT_FORMATS else b""
    if path.stat().st_size == 0 or (builder in TEXT_FORMATS and raw.strip() in (b"", b"[]", b"{}")):
        raise ValueError(f"data file {str(path)!r} is empty: it holds no examples")
    if builder in TEXT_FORMATS:
        check_utf8(path, raw)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # parse errors surface as several datasets / pyarrow exception types
        raise ValueError(f"cannot read {str(path)!r} as {builder}: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"data file {str(path)!r} is empty: it holds no examples")
    return ds


def check_utf8(path: Path, raw: bytes) -> None:
    """Refuse text data ``raw`` (the bytes of ``path``) that is not UTF-8, naming the file and the first bad byte.

    The ``datasets`` readers decode as UTF-8 and fail deep inside (or later, while normalising) with an error
    that names neither the file nor where in it the bad byte sits; checked here, in chunks, the file and the
    offset are known.
    """
    pos, size = 0, len(raw)
    while pos < size:
        end = min(pos + _UTF8_CHUNK, size)
        try:
            _, used = codecs.utf_8_decode(raw[pos:end], "strict", end == size)
        except UnicodeDecodeError as err:
            offset = pos + err.start
            line = raw.count(b"\n", 0, offset) + 1
            raise ValueError(
                f"data file {str(path)!r} is not valid UTF-8: byte 0x{raw[offset]:02x} at offset {offset} "
                f"(line {line}) cannot be decoded ({err.reason}); molex reads .json, .jsonl and .csv data as UTF-8: "
                f"re-encode the file, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
            ) from None
        pos += used  # > 0: a chunk that is not the last holds 1 MiB, at most 3 bytes of it left for the next


def read_folder(folder: Path) -> dict[str, datasets.Dataset]:
    """``train.*``, ``validation.*`` (or val / valid / dev) and ``test.*`` files of a folder."""
    splits: dict[str, datasets.Dataset] = {}
    for path in sorted(folder.iterdir()):
        split = _SPLIT_ALIASES.get(path.stem.lower())
        if split and path.suffix.lower() in FILE_FORMATS:
            if split in splits:
                raise ValueError(f"{folder} has several {split} files; keep one")
            splits[split] = read_file(path)
    if not splits:
        raise FileNotFoundError(
            f"no data files in folder {os.fspath(folder)!r}: expected train / validation / test files ending in "
            f"{sorted(FILE_FORMATS)}"
        )
    return splits


def read_hub(name: str, config: str | None = None) -> dict[str, datasets.Dataset]:
    """The train / validation / test splits of a hub dataset (other splits are left out)."""
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as err:  # datasets raises many error types for missing names / no network
        raise FileNotFoundError(
            f"data source {name!r} is not a local file or folder, and the hub could not provide it "
            f"({err.__class__.__name__}: {err}); pass an existing .json/.jsonl/.csv/.parquet path or 'builtin'"
        ) from err
    splits = {split_name(split): ds for split, ds in loaded.items() if split.lower() in _SPLIT_ALIASES}
    if "train" not in splits:
        raise ValueError(
            f"hub dataset {name!r} has no train split (its splits: {sorted(loaded)}); "
            "download it and pass {'train': path, ...} as the source"
        )
    return splits


def normalise(ds: datasets.Dataset, split: str, columns: Mapping[str, str]) -> datasets.Dataset:
    """Rename mapped columns to molex fields, check required ones, make every field a string."""
    found = list(ds.column_names)
    feature_columns = list(columns.get("features") or [])
    columns = {f: c for f, c in columns.items() if f != "features"}
    mapping = {field: columns.get(field, field) for field in FIELDS}
    missing = [f"{f} (column {mapping[f]!r})" for f in REQUIRED_FIELDS if mapping[f] not in found]
    absent_mapped = [f"{f} (column {c!r})" for f, c in columns.items() if c not in found]
    absent_mapped += [f"features (column {c!r})" for c in feature_columns if c not in found]
    missing += [m for m in absent_mapped if m not in missing]
    if missing:
        raise ValueError(
            f"{split} data is missing required column(s): {', '.join(missing)}; columns found: {found}. "
            "Rename them or map them with columns={'instruction': ..., 'output': ...}"
        )
    has_choices = mapping["choices"] in found

    def convert(example: dict[str, Any]) -> dict[str, Any]:
        out = {
            "instruction": _text(example[mapping["instruction"]]),
            "input": _text(example.get(mapping["input"])),
            "output": _text(example[mapping["output"]]),
            "task": _text(example.get(mapping["task"])) or DEFAULT_TASK,
        }
        if has_choices:
            out["choices"] = [_text(c) for c in (example[mapping["choices"]] or [])]
        if feature_columns:
            out["features"] = [_text(example[c]) for c in feature_columns]
        return out

    if len(ds) == 0:  # map() on no rows cannot infer the new columns
        empty = {field: [] for field in TEXT_FIELDS}
        return datasets.Dataset.from_dict({**empty, "features": []} if feature_columns else empty)
    keep = ["choices"] if has_choices and mapping["choices"] == "choices" else []
    return ds.map(
        convert,
        remove_columns=[c for c in found if c not in keep],
        keep_in_memory=True,
        new_fingerprint=fingerprint("normalise", split, ds._fingerprint, sorted(mapping.items()), feature_columns),
        desc=f"reading {split}",
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()
