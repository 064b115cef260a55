"""Read URL lists (parquet, csv, tsv, jsonl; one file or a folder of parts), batch by batch.

Every input row gets a global id ``row`` (file order, then line order; :func:`number_files`): the
key under which the rest of the pipeline accounts for it, kept or dropped. :func:`iter_file` holds
one batch at a time: a parquet row-group batch, or one csv/tsv/jsonl file (split a URL list of
billions of rows into files, as LAION and DataComp ship theirs: each file is planned by its own task).
"""
from __future__ import annotations

import csv
import json
import lzma
import math
import zlib
from concurrent.futures import Executor
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sigscale.curation.config import CurationError, InputConfig

SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
COLUMNS = ["row", "url", "caption", "declared_language", "extras"]


def _format_of(path: Path, wanted: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".xz"):
        suffixes = suffixes[:-1]
    fmt = SUFFIXES.get(suffixes[-1] if suffixes else "", "")
    if wanted != "auto":
        return wanted
    if not fmt:
        raise CurationError(
            f"cannot tell the format of {path} from its extension; name it .parquet/.csv/.tsv/.jsonl "
            "or set input.format"
        )
    return fmt


def list_files(cfg: InputConfig) -> List[Path]:
    """The URL-list files named by input.path, in the order their rows are numbered."""
    path = Path(cfg.path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CurationError(f"input.path {path} does not exist; point it at a URL list file or a folder of them")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and (cfg.format != "auto" or any(s.lower() in SUFFIXES for s in p.suffixes)))
    if not files:
        raise CurationError(
            f"input.path folder {path} holds no URL list files (.parquet/.csv/.tsv/.jsonl); "
            "put the lists there or point input.path at a file"
        )
    return files


# Errors a damaged file raises while it is decompressed or parsed; each becomes one CurationError.
_READ_ERRORS = (OSError, ValueError, EOFError, UnicodeDecodeError, zlib.error, lzma.LZMAError, csv.Error,
                pa.ArrowException, pd.errors.ParserError)


def _read_csv(path: Path, sep: str) -> pd.DataFrame:
    """A CSV/TSV read whole, field by field, with the first line as the header.

    pandas' C parser cuts a field at a NUL byte and, when every row ends with an extra separator,
    silently takes the first column as the index (captions then land in ``url``); its Python parser
    with an explicit header line does neither. A row longer than the header loses only empty
    trailing fields; a longer row with text there (an unquoted separator inside a caption) stops
    the read instead of shifting or truncating its caption.
    """
    width = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, engine="python").shape[1]

    def long_row(fields: List[str]) -> List[str]:
        if any(f.strip() for f in fields[width:]):
            raise CurationError(
                f"URL list {path} has a row with {len(fields)} fields where its header has {width} (it starts "
                f"{fields[0][:80]!r}); quote fields that contain {sep!r} (the csv module's quoting does it)")
        return fields[:width]

    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # the Python parser's default of 128 KiB per field would refuse a long caption
    try:
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, na_values=[""],
                         engine="python", on_bad_lines=long_row)
    finally:
        csv.field_size_limit(limit)
    header = [f"Unnamed: {i}" if pd.isna(name) else str(name) for i, name in enumerate(df.iloc[0])] if len(df) else []
    return df.iloc[1:].set_axis(header, axis=1).reset_index(drop=True)


@contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Any error a damaged file raises while it is decompressed or parsed, as one CurationError that names it."""
    try:
        yield
    except _READ_ERRORS as e:
        if isinstance(e, CurationError):
            raise
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        cause = str(e).splitlines()[0] if str(e) else "no message"
        raise CurationError(f"cannot read URL list {path} as {fmt} ({kind}: {cause}); the file is "
                            "damaged or not in that format: re-create or re-download it, or set input.format") from None


def _read(path: Path, fmt: str, columns: List[str], batch_rows: int) -> Iterator[pd.DataFrame]:
    """The file's rows, ``batch_rows`` at a time for parquet, whole for the text formats."""
    with _reading(path, fmt):
        try:
            if fmt == "parquet":
                with pq.ParquetFile(path) as f:
                    have = f.schema_arrow.names
                    batches = f.iter_batches(batch_size=batch_rows, columns=[c for c in columns if c in have])
                    empty = True
                    for batch in batches:
                        empty = False
                        yield batch.to_pandas()
                    if empty:
                        yield f.schema_arrow.empty_table().to_pandas()
            elif fmt in ("csv", "tsv"):
                yield _read_csv(path, "," if fmt == "csv" else "\t")
            else:
                yield pd.read_json(path, lines=True, dtype=False)
        except pd.errors.EmptyDataError:
            yield pd.DataFrame(columns=columns)


def _text_column(df: pd.DataFrame, col: str, path: Path) -> None:
    """Refuse a url/caption/language column holding numbers, lists or objects (jsonl of mixed types)."""
    for i, value in enumerate(df[col].tolist()):
        if value is not None and not isinstance(value, str) and not (isinstance(value, float) and math.isnan(value)):
            raise CurationError(
                f"URL list {path}: column {col!r} holds a value of type {type(value).__name__} ({str(value)[:60]!r}, "
                f"record {i + 1}) where text is expected; write every {col} as a string (JSON \"...\") or null")


# Rows per batch that iter_file reads from a parquet file: bounds the planner's memory (a batch of
# 250k rows and its copies through normalisation, ~0.5 GiB; `sigscale bench curation --sections plan`).
BATCH_ROWS = 250_000


def _columns(cfg: InputConfig) -> List[str]:
    return [cfg.url_col, cfg.caption_col, *([cfg.language_col] if cfg.language_col else []), *cfg.extra_cols]


def _require_columns(have: List[str], cfg: InputConfig, path: Path) -> None:
    missing = [c for c in _columns(cfg) if c not in have]
    if missing:
        raise CurationError(
            f"URL list {path} has no column(s) {missing} (it has {list(have)[:20]}); "
            "set input.url_col / input.caption_col / input.language_col / input.extra_cols to its names"
        )


def count_rows(cfg: InputConfig, path: Path) -> int:
    """Rows of one URL-list file, its columns checked: a parquet file's footer (no rows read), a text file parsed
    (as :func:`iter_file` will parse it). The planner numbers every file's rows from this before any task reads
    them, so that each file can be planned on its own."""
    fmt = _format_of(path, cfg.format)
    if fmt == "parquet":
        with _reading(path, fmt), pq.ParquetFile(path) as f:
            _require_columns(f.schema_arrow.names, cfg, path)
            return f.metadata.num_rows
    n = 0
    for df in _read(path, fmt, _columns(cfg), BATCH_ROWS):
        if len(df):
            _require_columns(list(df.columns), cfg, path)
        n += len(df)
    return n


def iter_file(cfg: InputConfig, path: Path, start: int = 0, batch_rows: Optional[int] = None) -> Iterator[pd.DataFrame]:
    """One file of the URL list in batches of columns row, url, caption, declared_language, extras (JSON), its
    rows numbered from ``start``."""
    for df in _read(path, _format_of(path, cfg.format), _columns(cfg), batch_rows or BATCH_ROWS):
        if len(df):
            yield _batch(df, cfg, path, start)
            start += len(df)


def number_files(cfg: InputConfig, pool: Optional[Executor] = None) -> List[Tuple[Path, int, int]]:
    """(file, its rows, its first row) of every URL-list file: rows are numbered in file order, then line order,
    from :func:`count_rows`, so that each file can then be read on its own (:func:`iter_file`). Text files, which
    are parsed to be counted, are counted over ``pool``'s processes when one is given; parquet footers here."""
    paths = list_files(cfg)
    text = [p for p in paths if _format_of(p, cfg.format) != "parquet"]
    counted = dict(zip(text, pool.map(count_rows, repeat(cfg), text))) if pool and len(text) > 1 else {}
    out, start = [], 0
    for path in paths:
        rows = counted[path] if path in counted else count_rows(cfg, path)
        out.append((path, rows, start))
        start += rows
    if start == 0:
        raise CurationError(f"URL list {cfg.path} has no rows; nothing to curate")
    return out


def _batch(df: pd.DataFrame, cfg: InputConfig, path: Path, start: int) -> pd.DataFrame:
    """One batch of a file in the pipeline's columns, its rows numbered from ``start``."""
    _require_columns(list(df.columns), cfg, path)
    for col in (cfg.url_col, cfg.caption_col, cfg.language_col):
        if col:
            _text_column(df, col, path)
    return pd.DataFrame({
        "row": pd.RangeIndex(start, start + len(df), dtype="int64"),
        "url": df[cfg.url_col].astype(object).where(df[cfg.url_col].notna(), None).to_numpy(),
        "caption": df[cfg.caption_col].astype(object).where(df[cfg.caption_col].notna(), None).to_numpy(),
        "declared_language": (df[cfg.language_col].astype(object).where(df[cfg.language_col].notna(), None)
                              .to_numpy() if cfg.language_col else None),
        "extras": ([json.dumps(r, ensure_ascii=False, default=str) for r in
                    df[cfg.extra_cols].astype(object).where(df[cfg.extra_cols].notna(), None).to_dict("records")]
                   if cfg.extra_cols else "{}"),
    })[COLUMNS]
