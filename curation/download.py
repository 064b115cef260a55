"""Drive img2dataset (the real one) over a part's URLs and account for every row it was given.

img2dataset has no hook for its HTTP client (``downloader.download_image`` calls urllib directly,
in worker processes it spawns), and urllib follows redirects to any host and to ftp://, reads a
body whole into memory and bounds each socket read only. So img2dataset never sees a row's real
URL: it is given ``http://127.0.0.1:<port>/<secret>/<row>`` on a :class:`fetch.FetchGateway` that
this module starts beside it, which fetches the real URL hop by hop under the URL policy, the byte
cap and the deadline (see ``fetch.py``) and streams the body back. Everything img2dataset does
after the bytes arrive (decode, resize, X-Robots-Tag, shard writing, per-shard stats) is its own.

img2dataset writes, per shard, a tar of the images that succeeded and a parquet with one line per
input row (status, error message, original size). The rows are matched back by their id, which
travels as an extra column; a row that appears in no parquet (a crashed shard) is counted as
``download_missing`` rather than lost. A row's network outcome is the gateway's record (reason and
final URL); img2dataset's status decides only what happened after a complete body arrived.

Facts this module relies on (img2dataset 1.47): it starts its workers with ``spawn``, so its caller
must sit under a ``__main__`` guard; its urllib honours ``*_proxy`` variables, so loopback is
exempted through ``no_proxy``; ``timeout`` bounds each socket read, so it is set above the
gateway's deadline and the gateway answers first; decoding goes through OpenCV, which refuses
images above ``OPENCV_IO_MAX_IMAGE_PIXELS`` from the header alone; ``incremental_mode="overwrite"``
fails on an existing folder, so every call gets a fresh one; albumentations asks PyPI for updates
on import unless ``NO_ALBUMENTATIONS_UPDATE=1``.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
from pathlib import Path
from typing import Iterator, Mapping, Optional, Tuple

import pandas as pd

from sigscale.core.progress import Progress
from sigscale.curation.config import CurationError, DownloadConfig
from sigscale.curation.fetch import FETCH_REASONS, FetchGateway, Fetcher, FetchLimits
from sigscale.curation.url_policy import UrlPolicy

ROW_COL = "sigscale_row"
RESULT_COLUMNS = ["row", "reason", "shard", "key", "original_width", "original_height", "final_url"]
# What img2dataset decides once a complete body has arrived.
ROBOTS_DISALLOWED = "robots_disallowed"
IMAGE_EMPTY = "image_empty"
IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
IMAGE_UNDECODABLE = "image_undecodable"
DOWNLOAD_ERROR = "download_error"  # img2dataset failed a row for a reason the gateway did not see
DOWNLOAD_MISSING = "download_missing"  # a row in no img2dataset result (a crashed shard)
DOWNLOAD_REASONS = FETCH_REASONS + (ROBOTS_DISALLOWED, IMAGE_EMPTY, IMAGE_TOO_MANY_PIXELS, IMAGE_UNDECODABLE,
                                    DOWNLOAD_ERROR, DOWNLOAD_MISSING)
# img2dataset's urllib waits this much longer than the gateway's deadline, so the gateway always answers first.
GATEWAY_SLACK = 10.0
Fetched = Mapping[int, Tuple[Optional[str], str]]


def classify_error(status: str, message: Optional[str]) -> Optional[str]:
    """Drop reason for one img2dataset result whose fetch the gateway completed (None for a success)."""
    if status == "success":
        return None
    message = message or ""
    if status == "failed_to_resize":
        if "CV_IO_MAX_IMAGE_PIXELS" in message:
            return IMAGE_TOO_MANY_PIXELS
        if "buf.empty()" in message:
            return IMAGE_EMPTY
        return IMAGE_UNDECODABLE
    if "X-Robots-Tag" in message:
        return ROBOTS_DISALLOWED
    return DOWNLOAD_ERROR


def row_reason(status: str, message: Optional[str], fetched: Optional[Tuple[Optional[str], str]]) -> Optional[str]:
    """A row's drop reason: the gateway's refusal if it refused, else img2dataset's verdict on the body."""
    if fetched is not None and fetched[0] is not None:
        return fetched[0]
    return classify_error(status, message)


@contextlib.contextmanager
def _environment(cfg: DownloadConfig) -> Iterator[None]:
    """Environment the spawned workers inherit, and the SIGINT handler; both restored afterwards."""
    wanted = {
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.max_image_pixels),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        # The workers talk to the gateway on loopback only; a site proxy must not be asked for it.
        "no_proxy": "*", "NO_PROXY": "*",
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


def fetch_limits(cfg: DownloadConfig) -> FetchLimits:
    """The per-URL budget of a download config."""
    return FetchLimits(timeout=cfg.timeout, deadline=cfg.deadline, max_bytes=cfg.max_bytes,
                       max_redirects=cfg.max_redirects, retries=cfg.retries)


def download(rows: pd.DataFrame, out_dir: Path, cfg: DownloadConfig, policy: UrlPolicy = UrlPolicy(),
             label: str = "") -> pd.DataFrame:
    """Fetch ``rows`` (columns row, url, caption) into ``out_dir`` (must not exist yet) under ``policy``.

    The default policy is the strictest: public addresses only.
    Returns one line per input row: row, reason (None when the image arrived), shard (the tar's
    stem), key, original_width, original_height, final_url (where the body came from after redirects).
    Progress (URLs done of ``len(rows)``, ETA) is printed while it runs; ``label`` names the part.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CurationError(f"download folder {out_dir} already exists; img2dataset needs a fresh folder per run")
    out_dir.mkdir(parents=True)
    if len(rows) == 0:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    url_list = out_dir / "urls.parquet"
    shards = out_dir / "shards"
    fetcher = Fetcher(policy, fetch_limits(cfg))
    with FetchGateway(dict(zip(rows["row"].tolist(), rows["url"].tolist())), fetcher) as gateway, _environment(cfg):
        gateway.progress = Progress(f"curate: download {label}".rstrip(), len(rows), "URLs done")
        pd.DataFrame({"url": [gateway.url_for(r) for r in rows["row"].tolist()],
                      "caption": rows["caption"].to_numpy(),
                      ROW_COL: rows["row"].to_numpy(dtype="int64")}).to_parquet(url_list, index=False)
        from img2dataset import download as img2dataset_download

        img2dataset_download(
            url_list=str(url_list), output_folder=str(shards), input_format="parquet", output_format="webdataset",
            url_col="url", caption_col="caption", save_additional_columns=[ROW_COL],
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_quality=cfg.encode_quality, encode_format="jpg",
            # Each worker costs seconds of imports (torch via webdataset); no more than there are shards.
            processes_count=min(cfg.processes, math.ceil(len(rows) / cfg.samples_per_shard)),
            # Retries happen in the gateway, inside the deadline; urllib's read timeout only backs it up.
            thread_count=cfg.threads, timeout=cfg.deadline + GATEWAY_SLACK, retries=0,
            number_sample_per_shard=cfg.samples_per_shard, extract_exif=False, compute_hash=None,
            enable_wandb=False, incremental_mode="incremental",
            # An empty list switches the check off in img2dataset; None would mean its defaults.
            disallowed_header_directives=list(cfg.disallowed_header_directives),
            user_agent_token=cfg.user_agent_token or None,
        )
    gateway.progress.close()
    fetched = dict(gateway.outcomes)
    pd.DataFrame({"row": list(fetched), "reason": [v[0] for v in fetched.values()],
                  "final_url": [v[1] for v in fetched.values()]}).to_parquet(out_dir / "fetched.parquet", index=False)
    return collect_results(rows, shards, fetched)


def collect_results(rows: pd.DataFrame, shards: Path, fetched: Optional[Fetched] = None) -> pd.DataFrame:
    """Match img2dataset's per-shard parquet files and the gateway's records to ``rows``; see :func:`download`."""
    fetched = fetched or {}
    frames = []
    for pq_path in sorted(Path(shards).glob("*.parquet")):
        try:
            df = pd.read_parquet(pq_path, columns=[ROW_COL, "key", "status", "error_message",
                                                   "original_width", "original_height"])
        except (OSError, ValueError) as e:  # a shard that crashed mid-write: its rows count as missing
            print(f"curate: unreadable img2dataset result {pq_path} ({e}); its rows count as {DOWNLOAD_MISSING}")
            continue
        df["shard"] = pq_path.stem
        frames.append(df)
    got = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[ROW_COL, "key", "status", "error_message", "original_width", "original_height", "shard"])
    got = got.astype({ROW_COL: "int64"}).drop_duplicates(ROW_COL, keep="last")  # a retried shard reports its rows again
    got["reason"] = pd.Series([row_reason(s, m, fetched.get(r)) for r, s, m in
                               zip(got[ROW_COL].tolist(), got["status"], got["error_message"])],
                              index=got.index, dtype=object)
    got["final_url"] = pd.Series([fetched.get(r, (None, None))[1] for r in got[ROW_COL].tolist()],
                                 index=got.index, dtype=object)
    got = got.rename(columns={ROW_COL: "row"})
    result = rows[["row"]].merge(got, on="row", how="left")
    result.loc[result["status"].isna(), "reason"] = DOWNLOAD_MISSING
    unknown = set(result["reason"].dropna()) - set(DOWNLOAD_REASONS)
    if unknown:
        raise RuntimeError(f"download reasons {sorted(unknown)} are missing from DOWNLOAD_REASONS")
    return result[RESULT_COLUMNS].reset_index(drop=True)
