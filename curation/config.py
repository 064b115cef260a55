"""The curation config: a typed dataclass schema loaded from YAML with dot-list overrides.

``sigscale curate --config curation/demo input.path=urls.parquet output.dir=out`` loads
``configs/curation/demo.yaml`` (a path works too), merges the overrides and validates the result
before any work starts; an unknown key fails with the closest known key.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sigscale.core import config as core_config
from sigscale.core.config import ConfigError, choice, config_hash
from sigscale.core.errors import SigscaleError
from sigscale.curation.langid import known_languages


class CurationError(SigscaleError, ValueError):
    """Curation input or state is unusable; the message names the file or key and the fix."""


FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl")
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
BALANCE_MODES = ("none", "cap", "temperature", "metadata")
# img2dataset's defaults: X-Robots-Tag directives that forbid use of an image.
ROBOTS_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@dataclass
class InputConfig:
    path: str = ""  # one file, or a folder of parts in one format
    format: str = "auto"  # auto: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    language_col: str = ""  # optional declared language, kept as "declared_language"
    extra_cols: List[str] = field(default_factory=list)  # copied into each sample's json


@dataclass
class TextConfig:
    languages: List[str] = field(default_factory=list)  # allow-list of ISO 639-1 codes; empty: any
    # Language-ID probability below which a caption's language is undetermined: dropped when text.languages
    # is set, kept as "und" when any language goes.
    min_confidence: float = 0.5
    language_thresholds: Dict[str, float] = field(default_factory=dict)  # per-language override
    trust_language_col: bool = False  # take input.language_col instead of detecting
    # Prior probability that input.language_col is right, before the caption is read (langid.decide);
    # 0: ignore the column when detecting.
    declared_prior: float = 0.5
    confidence_chars: int = 60  # captions shorter than this face a proportionally lower threshold; 0: off
    min_chars: int = 3
    max_chars: int = 1000
    min_words: int = 1  # CJK runs count one word per two characters
    max_words: int = 200
    blocked_domains: List[str] = field(default_factory=list)  # a domain blocks its subdomains too
    blocked_patterns: List[str] = field(default_factory=list)  # regexes searched in url and caption
    allow_private_networks: bool = False
    allowed_networks: List[str] = field(default_factory=list)  # CIDRs exempt from the private-address refusal
    refused_networks: List[str] = field(default_factory=list)  # CIDRs never contacted, even public or allowed
    # DNS-resolve names in the text stage already (saves fetch attempts); every download hop is
    # resolved and checked at fetch time whatever this says.
    resolve_hosts: bool = True


@dataclass
class DownloadConfig:
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    processes: int = 2
    threads: int = 32
    timeout: int = 10  # seconds one connect or socket read may wait
    deadline: float = 30.0  # seconds per URL for everything: DNS, connects, redirects, reads, retries
    max_bytes: int = 32 * 2**20  # body bytes per URL, counted while streaming (image.max_bytes: after re-encoding)
    max_redirects: int = 5
    retries: int = 0  # extra attempts after a timeout, connection error or 5xx, within the deadline
    samples_per_shard: int = 10000  # img2dataset's shards inside a part
    # Refused from the image header by OpenCV before decoding (decompression bombs); PIL's default limit.
    max_image_pixels: int = 89_478_485
    disallowed_header_directives: List[str] = field(default_factory=lambda: list(ROBOTS_DIRECTIVES))
    user_agent_token: str = ""


@dataclass
class ScoreConfig:
    model: str = ""  # a checkpoint sigscale.pretrain.interop.load_model reads; empty: no score filter
    tokenizer: str = ""  # its SentencePiece .model
    min_score: Optional[float] = None  # image-text cosine similarity below which a pair is dropped
    top_fraction: Optional[float] = None  # keep this fraction with the highest scores
    batch_size: int = 128


@dataclass
class ImageConfig:
    min_side: int = 64  # of the original image
    max_aspect: float = 3.0
    min_bytes: int = 0  # of the stored (re-encoded) image; near-blank images compress to almost nothing
    max_bytes: int = 0  # 0: no limit
    phash_threshold: int = 8  # Hamming distance of 64-bit pHashes for near-duplicates; -1: off
    # pHash sees luminance only; candidate pairs must also agree in colour: mean absolute difference
    # of 16x16 RGB thumbnails (0-255) at most this much. Negative: pHash alone decides.
    thumb_max_diff: float = 3.0
    decontaminate: List[str] = field(default_factory=list)  # eval image folders (ImageFolder, XM3600 images/)
    score: ScoreConfig = field(default_factory=ScoreConfig)


@dataclass
class BalanceConfig:
    mode: str = "none"  # none | cap | temperature | metadata
    max_fraction: float = 1.0  # cap: no language above this share of the output
    temperature: float = 1.0  # temperature: p_lang proportional to n_lang^(1/T); 1 keeps the mix
    # metadata (MetaCLIP): language -> file of entries, one a line; captions of other languages match nothing
    metadata: Dict[str, str] = field(default_factory=dict)
    threshold: int = 20000  # t: captions kept per entry at most (about); MetaCLIP's 400M set used 20k
    thresholds: Dict[str, int] = field(default_factory=dict)  # t_lang per language (MetaCLIP 2)
    seed: int = 0


@dataclass
class OutputConfig:
    dir: str = ""
    samples_per_shard: int = 1000
    rows_per_part: int = 100_000  # URL-list rows per part (one local run or one Slurm array task)
    corpus: bool = True  # write captions.txt for tokenizer training
    plots: bool = True
    keep_downloads: bool = False  # keep all of img2dataset's output in each part (its tars always stay: the images)
    # Partitions of the exact (url, caption) dedup (one task each, ~110 bytes per URL-list row of its partition
    # at peak): raise it with the list, one per 20M rows for ~2.5 GiB per task (the planner warns).
    dedup_partitions: int = 1
    # Processes running the tasks of one dedup or finalize step when `sigscale curate` runs them here
    # (`submit curate` runs each step as a Slurm array instead).
    local_processes: int = 1
    # pHash-band partitions of the near-duplicate/decontamination step (one task each, ~350 bytes per band copy,
    # phash_threshold + 1 copies per candidate): one per 6M copies for ~2.5 GiB per task (the planner warns).
    finalize_partitions: int = 1


@dataclass
class CurationConfig:
    name: str = "curation"
    input: InputConfig = field(default_factory=InputConfig)
    text: TextConfig = field(default_factory=TextConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir)

    @property
    def work_dir(self) -> Path:
        return Path(self.output.dir) / "work"


def load_curation_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CurationConfig:
    """Load a curation YAML (a path or a name in configs/curation/) plus dot-list overrides, validated."""
    cfg = core_config.load(CurationConfig, path, overrides, folders=("curation",))
    validate(cfg)
    return cfg


def _fraction(value: Optional[float], key: str, open_low: bool = True) -> None:
    if value is not None and not ((0 < value if open_low else 0 <= value) and value <= 1):
        raise ConfigError(f"{key}={value} must be in (0, 1]")


def validate(cfg: CurationConfig) -> None:
    """Reject impossible settings before any file is read or URL fetched."""
    i, t, d, im, b, o = cfg.input, cfg.text, cfg.download, cfg.image, cfg.balance, cfg.output
    if not i.path:
        raise ConfigError("input.path is empty; set it to a URL list file or folder (input.path=urls.parquet)")
    if not o.dir:
        raise ConfigError("output.dir is empty; set it to the folder for shards and manifest (output.dir=curated)")
    choice(i.format, FORMATS, "input.format")
    choice(d.resize_mode, RESIZE_MODES, "download.resize_mode")
    choice(b.mode, BALANCE_MODES, "balance.mode")
    if not i.url_col or not i.caption_col:
        raise ConfigError("input.url_col and input.caption_col must name columns of the URL list")
    if t.trust_language_col and not i.language_col:
        raise ConfigError("text.trust_language_col=true needs input.language_col; name the column or detect languages")
    _validate_language_id(t)
    if t.min_chars > t.max_chars or t.min_words > t.max_words:
        raise ConfigError(
            f"text.min_chars/min_words ({t.min_chars}/{t.min_words}) exceed max_chars/max_words "
            f"({t.max_chars}/{t.max_words}); lower the minimum or raise the maximum"
        )
    for pattern in t.blocked_patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"text.blocked_patterns entry {pattern!r} is not a regular expression: {e}") from None
    for key in ("allowed_networks", "refused_networks"):
        for net in getattr(t, key):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"text.{key} entry {net!r} is not a CIDR network such as 127.0.0.1/32") from None
    for key in ("image_size", "processes", "threads", "timeout", "deadline", "max_bytes", "samples_per_shard",
                "max_image_pixels"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"download.{key}={getattr(d, key)} must be positive")
    for key in ("max_redirects", "retries"):
        if getattr(d, key) < 0:
            raise ConfigError(f"download.{key}={getattr(d, key)} must be >= 0 (0: none)")
    if not 0 <= d.encode_quality <= 100:
        raise ConfigError(f"download.encode_quality={d.encode_quality} must be in [0, 100]")
    if im.max_aspect < 1:
        raise ConfigError(f"image.max_aspect={im.max_aspect} must be >= 1 (long side / short side)")
    if im.max_bytes and im.max_bytes < im.min_bytes:
        raise ConfigError(f"image.max_bytes={im.max_bytes} is below image.min_bytes={im.min_bytes}")
    if not -1 <= im.phash_threshold <= 64:
        raise ConfigError(f"image.phash_threshold={im.phash_threshold} must be -1 (off) or a Hamming distance 0..64")
    for folder in im.decontaminate:
        if not Path(folder).is_dir():
            raise ConfigError(f"image.decontaminate folder {folder} does not exist; give eval image folders")
    s = im.score
    _fraction(s.top_fraction, "image.score.top_fraction")
    if (s.min_score is not None or s.top_fraction is not None) and not s.model:
        raise ConfigError("image.score.min_score/top_fraction need image.score.model (a checkpoint to score with)")
    if s.model and not (s.tokenizer and Path(s.tokenizer).is_file()):
        raise ConfigError(f"image.score.tokenizer={s.tokenizer!r} is not a file; give the SentencePiece .model of the scoring checkpoint")
    if s.model and not Path(s.model).exists():
        raise ConfigError(f"image.score.model {s.model} does not exist; give a HF SiglipModel dir or a sigscale run dir")
    if b.mode == "cap":
        _fraction(b.max_fraction, "balance.max_fraction")
    if b.mode == "temperature" and b.temperature <= 0:
        raise ConfigError(f"balance.temperature={b.temperature} must be positive")
    if b.mode == "metadata":
        _validate_metadata(b)
    for key in ("samples_per_shard", "rows_per_part", "dedup_partitions", "local_processes", "finalize_partitions"):
        if getattr(o, key) <= 0:
            raise ConfigError(f"output.{key}={getattr(o, key)} must be positive")


def _validate_language_id(t: TextConfig) -> None:
    if t.languages or t.language_thresholds:
        known = known_languages()
        unknown = sorted((set(t.languages) | set(t.language_thresholds)) - known)
        if unknown:
            raise ConfigError(
                f"text.languages / text.language_thresholds name unknown language code(s) {unknown}; "
                f"use ISO 639-1 codes the language identifier knows, e.g. {sorted(known)[:12]}"
            )
    for key, value in [("text.min_confidence", t.min_confidence), *[(f"text.language_thresholds.{k}", v)
                                                                   for k, v in t.language_thresholds.items()]]:
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must be a probability in [0, 1]")
    if not 0 <= t.declared_prior < 1:
        raise ConfigError(f"text.declared_prior={t.declared_prior} must be in [0, 1); to take the column as it is "
                          "set text.trust_language_col=true")
    if t.confidence_chars < 0:
        raise ConfigError(f"text.confidence_chars={t.confidence_chars} must be >= 0 (0: one threshold for every length)")


def _validate_metadata(b: BalanceConfig) -> None:
    if not b.metadata:
        raise ConfigError("balance.mode=metadata needs balance.metadata: a file of entries per language "
                          "(balance.metadata.en=entries_en.txt)")
    for lang, path in b.metadata.items():
        if not Path(path).is_file():
            raise ConfigError(f"balance.metadata.{lang} file {path} does not exist; give a text file with one entry a line")
    for key, value in [("balance.threshold", b.threshold), *[(f"balance.thresholds.{k}", v) for k, v in b.thresholds.items()]]:
        if value <= 0:
            raise ConfigError(f"{key}={value} must be a positive number of captions per entry")
    extra = sorted(set(b.thresholds) - set(b.metadata))
    if extra:
        raise ConfigError(f"balance.thresholds names language(s) {extra} without balance.metadata entries; "
                          "add their entry files or remove the thresholds")


def part_config_hash(cfg: CurationConfig) -> str:
    """Hash of everything a part's result depends on; finalize-only settings are left out."""
    image = dataclasses.asdict(cfg.image)
    image.pop("decontaminate")
    image.pop("phash_threshold")
    image.pop("thumb_max_diff")
    image["score"] = {"model": cfg.image.score.model, "tokenizer": cfg.image.score.tokenizer}
    download = dataclasses.asdict(cfg.download)
    for key in ("processes", "threads"):  # parallelism does not change what a part keeps
        download.pop(key)
    return config_hash({"input": dataclasses.asdict(cfg.input), "text": dataclasses.asdict(cfg.text),
                        "download": download, "image": image,
                        "rows_per_part": cfg.output.rows_per_part})
