"""Read URL lists (parquet, csv, tsv, jsonl; one file or a folder of parts) into one table.

Every input row gets a global id ``row`` (file order, then line order): the key under which the
rest of the pipeline accounts for it, kept or dropped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pandas as pd

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


def _read(path: Path, fmt: str, columns: List[str]) -> pd.DataFrame:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            have = pq.read_schema(path).names
            return pd.read_parquet(path, columns=[c for c in columns if c in have])
        if fmt in ("csv", "tsv"):
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                               na_values=[""])
        return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        if isinstance(e, pd.errors.EmptyDataError):
            return pd.DataFrame(columns=columns)
        raise CurationError(f"cannot read URL list {path} as {fmt}: {str(e).splitlines()[0]}; "
                            "check the file or set input.format") from None


def read_url_list(cfg: InputConfig) -> pd.DataFrame:
    """All rows of the URL list as columns row, url, caption, declared_language, extras (JSON)."""
    columns = [cfg.url_col, cfg.caption_col, *([cfg.language_col] if cfg.language_col else []), *cfg.extra_cols]
    frames = []
    start = 0
    for path in list_files(cfg):
        df = _read(path, _format_of(path, cfg.format), columns)
        if len(df) == 0:
            continue
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise CurationError(
                f"URL list {path} has no column(s) {missing} (it has {list(df.columns)[:20]}); "
                "set input.url_col / input.caption_col / input.language_col / input.extra_cols to its names"
            )
        out = pd.DataFrame({
            "row": pd.RangeIndex(start, start + len(df), dtype="int64"),
            "url": df[cfg.url_col].astype(object).where(df[cfg.url_col].notna(), None).to_numpy(),
            "caption": df[cfg.caption_col].astype(object).where(df[cfg.caption_col].notna(), None).to_numpy(),
            "declared_language": (df[cfg.language_col].astype(object).where(df[cfg.language_col].notna(), None)
                                  .to_numpy() if cfg.language_col else None),
            "extras": ([json.dumps(r, ensure_ascii=False, default=str) for r in
                        df[cfg.extra_cols].astype(object).where(df[cfg.extra_cols].notna(), None).to_dict("records")]
                       if cfg.extra_cols else "{}"),
        })
        frames.append(out)
        start += len(df)
    if start == 0:
        raise CurationError(f"URL list {cfg.path} has no rows; nothing to curate")
    return pd.concat(frames, ignore_index=True)[COLUMNS]
