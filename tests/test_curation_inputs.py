"""Curation inputs: the typed config (with its errors) and URL lists in every format (with theirs)."""
import json

import pandas as pd
import pytest

from sigscale import CONFIG_DIR
from sigscale.curation.config import CurationError, load_curation_config
from sigscale.curation.sources import count_rows, iter_file, number_files
from sigscale.core.config import ConfigError


def read_all(cfg):
    """The whole URL list as one table: every batch the plan tasks would read, each file from the first row the
    layout numbers it from, concatenated; each file's rows as many as its count says."""
    batches = []
    for path, rows, start in number_files(cfg):
        mine = list(iter_file(cfg, path, start))
        assert sum(len(b) for b in mine) == rows == count_rows(cfg, path)
        batches += mine
    return pd.concat(batches, ignore_index=True)

ROWS = pd.DataFrame({
    "URL": ["http://a.example/1.jpg", "http://a.example/2.jpg", "https://b.example/3.png"],
    "TEXT": ['a "red", round circle', None, "三个红色的圆形"],
    "lang": ["en", "de", "zh"],
    "width": [640, 800, None],
})


def cfg_for(path, *extra):
    return load_curation_config("default", [f"input.path={path}", "output.dir=out", "input.url_col=URL",
                                            "input.caption_col=TEXT", "input.language_col=lang",
                                            "input.extra_cols=[width]", *extra]).input


def write(df, path):
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        df.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


def test_shipped_curation_configs_load():
    for name in ("default", "demo", CONFIG_DIR / "curation" / "demo.yaml"):
        cfg = load_curation_config(name, ["input.path=urls.parquet", "output.dir=out"])
        assert cfg.input.path == "urls.parquet" and cfg.download.timeout > 0
    demo = load_curation_config("demo", ["input.path=u", "output.dir=o"])
    assert demo.text.allow_private_networks and len(demo.text.languages) == 9 and demo.download.image_size == 64


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    df = read_all(cfg_for(write(ROWS, tmp_path / f"urls{suffix}")))
    assert df["row"].tolist() == [0, 1, 2]
    assert df["url"].tolist() == ROWS["URL"].tolist()
    assert df["caption"].tolist() == ['a "red", round circle', None, "三个红色的圆形"]
    assert df["declared_language"].tolist() == ["en", "de", "zh"]
    widths = [json.loads(e)["width"] for e in df["extras"]]
    assert [None if w is None else float(w) for w in widths] == [640.0, 800.0, None]


def test_a_folder_of_parts_is_numbered_in_file_order(tmp_path):
    write(ROWS.iloc[:2], tmp_path / "part-0.parquet")
    write(ROWS.iloc[2:], tmp_path / "part-1.csv")
    (tmp_path / "README.txt").write_text("not a list")
    df = read_all(cfg_for(tmp_path))
    assert df["row"].tolist() == [0, 1, 2] and df["url"].tolist() == ROWS["URL"].tolist()


def test_text_files_counted_over_processes_are_numbered_as_counted_here(tmp_path):
    from sigscale.curation.tasks import local_pool

    for k, fmt in enumerate(["csv", "parquet", "tsv", "jsonl", "csv"]):
        write(ROWS.iloc[: k + 1], tmp_path / f"part-{k}.{fmt}")
    cfg = cfg_for(tmp_path)
    with local_pool(2) as pool:  # spawned processes count the four text files, the parquet footer is read here
        counted = number_files(cfg, pool)
    assert counted == number_files(cfg) and [(p.name, n, s) for p, n, s in counted] == [
        ("part-0.csv", 1, 0), ("part-1.parquet", 2, 1), ("part-2.tsv", 3, 3), ("part-3.jsonl", 3, 6),
        ("part-4.csv", 3, 9)]


def test_bad_url_lists_fail_naming_file_and_column(tmp_path):
    write(ROWS, tmp_path / "urls.csv")
    with pytest.raises(CurationError, match=r"urls.csv has no column\(s\) \['caption'\] \(it has \['URL', 'TEXT', 'lang', 'width'\]\)"):
        read_all(load_curation_config("default", [f"input.path={tmp_path / 'urls.csv'}", "output.dir=o",
                                                       "input.url_col=URL"]).input)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(CurationError, match=r"cannot read URL list .*broken.parquet as parquet"):
        read_all(cfg_for(bad))
    empty = tmp_path / "empty.csv"
    empty.write_text("URL,TEXT,lang,width\n")
    with pytest.raises(CurationError, match=r"URL list .*empty.csv has no rows; nothing to curate"):
        read_all(cfg_for(empty))
    with pytest.raises(CurationError, match=r"input.path .*missing.parquet does not exist"):
        read_all(cfg_for(tmp_path / "missing.parquet"))
    (tmp_path / "nolists").mkdir()
    with pytest.raises(CurationError, match=r"folder .*nolists holds no URL list files"):
        read_all(cfg_for(tmp_path / "nolists"))
    odd = tmp_path / "urls.xlsx"
    odd.write_text("x")
    with pytest.raises(CurationError, match=r"cannot tell the format of .*urls.xlsx .*set input.format"):
        read_all(cfg_for(odd))


@pytest.mark.parametrize("override, message", [
    ("text.min_confidance=0.3", "unknown config key 'text.min_confidance' in default + overrides; did you mean 'text.min_confidence'?"),
    ("download.timeout=soon", "wrong type for config key 'download.timeout'"),
    ("balance.mode=uniform", "balance.mode='uniform' is not one of ['none', 'cap', 'temperature', 'metadata']"),
    ("download.resize_mode=stretch", "download.resize_mode='stretch' is not one of"),
    ("text.languages=[en,xx]", "unknown language code(s) ['xx']"),
    ("text.language_thresholds.de=1.5", "text.language_thresholds.de=1.5 must be a probability in [0, 1]"),
    ("text.min_chars=2000", "text.min_chars/min_words (2000/2) exceed max_chars/max_words"),
    ("text.blocked_patterns=['(unclosed']", "text.blocked_patterns entry '(unclosed' is not a regular expression"),
    ("text.allowed_networks=[10.0.0.300/8]", "text.allowed_networks entry '10.0.0.300/8' is not a CIDR network"),
    ("text.trust_language_col=true", "text.trust_language_col=true needs input.language_col"),
    ("download.processes=0", "download.processes=0 must be positive"),
    ("image.max_aspect=0.5", "image.max_aspect=0.5 must be >= 1"),
    ("image.phash_threshold=65", "image.phash_threshold=65 must be -1 (off) or a Hamming distance 0..64"),
    ("image.decontaminate=[/no/such/eval]", "image.decontaminate folder /no/such/eval does not exist"),
    ("image.score.top_fraction=0.5", "image.score.min_score/top_fraction need image.score.model"),
    ("image.score.model=/no/model", "image.score.tokenizer='' is not a file"),
    ("balance.mode=cap", None),
    ("balance.max_fraction=1.5", None),
    ("output.rows_per_part=0", "output.rows_per_part=0 must be positive"),
    ("input.url_col=''", "input.url_col and input.caption_col must name columns of the URL list"),
    ("download.encode_quality=101", "download.encode_quality=101 must be in [0, 100]"),
    ("image.min_bytes=100 image.max_bytes=10", "image.max_bytes=10 is below image.min_bytes=100"),
    ("image.score.top_fraction=0", "image.score.top_fraction=0.0 must be in (0, 1]"),
    (f"image.score.tokenizer={CONFIG_DIR / 'tiny.yaml'} image.score.model=/no/model",
     "image.score.model /no/model does not exist; give a HF SiglipModel dir or a sigscale run dir"),
    ("text.languages=[en,de", "cannot parse overrides ['input.path=urls.parquet', 'output.dir=out', 'text.languages=[en,de']"),
])
def test_config_errors_name_the_key_and_the_fix(override, message):
    base = ["input.path=urls.parquet", "output.dir=out"]
    if message is None:  # valid alone; invalid together below
        load_curation_config("default", [*base, override])
        return
    with pytest.raises(ConfigError) as e:
        load_curation_config("default", [*base, *override.split(" ")])
    assert message in str(e.value)


def test_more_config_errors():
    with pytest.raises(ConfigError, match=r"balance.max_fraction=1.5 must be in \(0, 1\]"):
        load_curation_config("default", ["input.path=u", "output.dir=o", "balance.mode=cap", "balance.max_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"balance.temperature=0.0 must be positive"):
        load_curation_config("default", ["input.path=u", "output.dir=o", "balance.temperature=0"])
    with pytest.raises(ConfigError, match=r"input.path is empty; set it to a URL list"):
        load_curation_config("default", ["output.dir=o"])
    with pytest.raises(ConfigError, match=r"output.dir is empty"):
        load_curation_config("default", ["input.path=u"])
    with pytest.raises(ConfigError, match=r"config nope.yaml does not exist; give a YAML path or a name from .*configs/curation"):
        load_curation_config("nope.yaml")


def test_state_errors_of_the_pipeline(tmp_path):
    from sigscale.curation.config import DownloadConfig
    from sigscale.curation.download import download
    from sigscale.curation.finalize import finalize
    from sigscale.curation.pipeline import Part, eval_set_hashes, load_outcomes, run_part

    cfg = load_curation_config("demo", [f"input.path={tmp_path / 'u.parquet'}", f"output.dir={tmp_path / 'out'}"])
    with pytest.raises(CurationError, match=r"no plan.json in .*work; run `sigscale curate`"):
        finalize(cfg)
    with pytest.raises(CurationError, match=r"no plan.json in .*work; run `sigscale curate`"):
        run_part(cfg, Part(3, 0, 10))
    with pytest.raises(CurationError, match=r"no outcomes.parquet under .*; run `sigscale curate`"):
        load_outcomes(tmp_path / "out")
    (tmp_path / "dl").mkdir()
    with pytest.raises(CurationError, match=r"download folder .*dl already exists; img2dataset needs a fresh folder"):
        download(pd.DataFrame({"row": [0], "url": ["http://x/y.jpg"], "caption": ["c"]}), tmp_path / "dl", DownloadConfig())
    (tmp_path / "eval").mkdir()
    cfg.image.decontaminate = [str(tmp_path / "eval")]
    with pytest.raises(CurationError, match=r"image.decontaminate folders .*eval'\] hold no images; check the paths"):
        eval_set_hashes(cfg)


def test_a_list_where_nothing_survives_fails_after_writing_stats(tmp_path):
    from sigscale.curation.finalize import curate

    write(pd.DataFrame({"url": ["ftp://a/1.jpg", "http://b.example/2.jpg"], "caption": ["a red circle", None]}),
          tmp_path / "u.csv")
    cfg = load_curation_config("demo", [f"input.path={tmp_path / 'u.csv'}", f"output.dir={tmp_path / 'out'}",
                                        "input.language_col=''", "input.extra_cols=[]"])
    with pytest.raises(CurationError, match=r"no sample survived curation of .*u.csv; see .*stats.json"):
        curate(cfg)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped"] == {"url_invalid": 1, "caption_empty": 1} and stats["kept"] == 0
