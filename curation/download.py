"""Drive img2dataset (the real one) over a part's URLs and account for every row it was given.

img2dataset writes, per shard, a tar of the images that succeeded and a parquet with one line per
input row (status, error message, original size). The rows are matched back by their id, which
travels as an extra column; a row that appears in no parquet (a crashed shard) is counted as
``download_missing`` rather than lost.

Facts this module relies on (img2dataset 1.47): it starts its workers with ``spawn``, so its caller
must sit under a ``__main__`` guard; ``timeout`` bounds each socket read, not the whole transfer;
decoding goes through OpenCV, which refuses images above ``OPENCV_IO_MAX_IMAGE_PIXELS`` from the
header alone; ``incremental_mode="overwrite"`` fails on an existing folder, so every call gets a
fresh one; albumentations asks PyPI for updates on import unless ``NO_ALBUMENTATIONS_UPDATE=1``.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd

from sigscale.curation.config import CurationError, DownloadConfig

ROW_COL = "sigscale_row"
RESULT_COLUMNS = ["row", "reason", "shard", "key", "original_width", "original_height"]
DOWNLOAD_REASONS = (
    "http_404", "http_4xx", "http_5xx", "redirect_loop", "redirect_error", "timeout", "connection_error",
    "robots_disallowed", "download_error", "image_empty", "image_too_many_pixels", "image_undecodable",
    "download_missing",
)
_HTTP = re.compile(r"HTTP Error (\d{3})")


def classify_error(status: str, message: Optional[str]) -> Optional[str]:
    """Drop reason for one img2dataset result (None for a success)."""
    if status == "success":
        return None
    message = message or ""
    if status == "failed_to_resize":
        if "CV_IO_MAX_IMAGE_PIXELS" in message:
            return "image_too_many_pixels"
        if "buf.empty()" in message:
            return "image_empty"
        return "image_undecodable"
    if "X-Robots-Tag" in message:
        return "robots_disallowed"
    m = _HTTP.search(message)
    if m:
        code = int(m.group(1))
        if 300 <= code < 400:
            return "redirect_loop" if "infinite loop" in message else "redirect_error"
        return "http_404" if code == 404 else ("http_4xx" if code < 500 else "http_5xx")
    if "timed out" in message.lower():
        return "timeout"
    if any(s in message for s in ("urlopen error", "Connection", "Remote end closed", "IncompleteRead",
                                  "Errno")):
        return "connection_error"
    return "download_error"


@contextlib.contextmanager
def _environment(cfg: DownloadConfig) -> Iterator[None]:
    """Environment the spawned workers inherit, and the SIGINT handler; both restored afterwards."""
    wanted = {
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.max_image_pixels),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    # img2dataset installs a SIGINT handler that exits with status 0; keep Ctrl-C meaning Ctrl-C after it.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, sigint)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def download(rows: pd.DataFrame, out_dir: Path, cfg: DownloadConfig) -> pd.DataFrame:
    """Fetch ``rows`` (columns row, url, caption) into ``out_dir`` (must not exist yet).

    Returns one line per input row: row, reason (None when the image arrived), shard (the tar's
    stem), key, original_width, original_height.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CurationError(f"download folder {out_dir} already exists; img2dataset needs a fresh folder per run")
    out_dir.mkdir(parents=True)
    if len(rows) == 0:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    url_list = out_dir / "urls.parquet"
    pd.DataFrame({"url": rows["url"].to_numpy(), "caption": rows["caption"].to_numpy(),
                  ROW_COL: rows["row"].to_numpy(dtype="int64")}).to_parquet(url_list, index=False)
    shards = out_dir / "shards"
    with _environment(cfg):
        from img2dataset import download as img2dataset_download

        img2dataset_download(
            url_list=str(url_list), output_folder=str(shards), input_format="parquet", output_format="webdataset",
            url_col="url", caption_col="caption", save_additional_columns=[ROW_COL],
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_quality=cfg.encode_quality, encode_format="jpg",
            # Each worker costs seconds of imports (torch via webdataset); no more than there are shards.
            processes_count=min(cfg.processes, math.ceil(len(rows) / cfg.samples_per_shard)),
            thread_count=cfg.threads, timeout=cfg.timeout, retries=cfg.retries,
            number_sample_per_shard=cfg.samples_per_shard, extract_exif=False, compute_hash=None,
            enable_wandb=False, incremental_mode="incremental",
            # An empty list switches the check off in img2dataset; None would mean its defaults.
            disallowed_header_directives=list(cfg.disallowed_header_directives),
            user_agent_token=cfg.user_agent_token or None,
        )
    return collect_results(rows, shards)


def collect_results(rows: pd.DataFrame, shards: Path) -> pd.DataFrame:
    """Match img2dataset's per-shard parquet files back to ``rows``; see :func:`download` for the columns."""
    frames = []
    for pq_path in sorted(Path(shards).glob("*.parquet")):
        try:
            df = pd.read_parquet(pq_path, columns=[ROW_COL, "key", "status", "error_message",
                                                   "original_width", "original_height"])
        except (OSError, ValueError) as e:  # a shard that crashed mid-write: its rows count as missing
            print(f"curate: unreadable img2dataset result {pq_path} ({e}); its rows count as download_missing")
            continue
        df["shard"] = pq_path.stem
        frames.append(df)
    got = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[ROW_COL, "key", "status", "error_message", "original_width", "original_height", "shard"])
    got = got.astype({ROW_COL: "int64"}).drop_duplicates(ROW_COL, keep="last")  # a retried shard reports its rows again
    got["reason"] = pd.Series([classify_error(s, m) for s, m in zip(got["status"], got["error_message"])],
                              index=got.index, dtype=object)
    got = got.rename(columns={ROW_COL: "row"})
    result = rows[["row"]].merge(got, on="row", how="left")
    result.loc[result["status"].isna(), "reason"] = "download_missing"
    return result[RESULT_COLUMNS].reset_index(drop=True)
