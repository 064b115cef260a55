"""Hostile input to curation: every hop under the URL policy, a byte cap and a deadline per URL, loud input errors.

Loopback stands for the world: 127.0.0.2 is the one host the policy allows (``text.allowed_networks``);
127.0.0.1 and 127.0.0.3 stand for internal services it refuses, each with a server that records
every connection it accepts, and an FTP-ish listener on 127.0.0.1 records any connection at all.
Two real curation runs (real img2dataset behind the fetch gateway) carry all hostile rows.
"""
import csv
import gzip
import io
import ipaddress
import json
import socket
import tarfile
import threading
import time
from urllib.parse import quote

import pandas as pd
import pytest

from sigscale.cli import main
from sigscale.core.config import ConfigError
from sigscale.core.manifest import load_manifest
from sigscale.curation import synthetic
from sigscale.curation.config import CurationError, TextConfig, load_curation_config
from sigscale.curation.fetch import (
    BODY_TOO_LARGE, DEADLINE, REDIRECT_REFUSED, Fetcher, FetchLimits, Refused,
)
from sigscale.curation.finalize import curate
from sigscale.curation.pipeline import DROP_REASONS, load_outcomes
from sigscale.curation.serve import ImageServer
from sigscale.curation.text_filters import host_verdicts, normalize_caption
from sigscale.curation.url_policy import UrlPolicy, normalize_host, split_url
from test_curation_inputs import read_all

pytestmark = pytest.mark.slow  # two img2dataset runs: ~25 s on 2 cores

ALLOWED = "127.0.0.2"
REFUSED = "127.0.0.1"
OTHER_REFUSED = "127.0.0.3"
TIMEOUT_S, DEADLINE_S, MAX_BYTES, MAX_REDIRECTS = 2, 4, 1 << 20, 4
KEPT = None
BIDI = "\u202e"
# How a URL can name 127.0.0.1 (or ::1) without writing it: inet_aton forms, Unicode digits and dots, IPv6.
NUMERIC_LOOPBACK = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0", "0x7f.1",
                    "\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127\u30020\u30020\u30021",
                    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]


class ConnectionRecorder:
    """A TCP listener that records every connection and greets it like an FTP server."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.connections.append(addr)
            with conn:
                conn.sendall(b"220 internal ftp\r\n")

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def endpoints():
    servers = {"allowed": ImageServer(host=ALLOWED), "refused": ImageServer(host=REFUSED),
               "other_refused": ImageServer(host=OTHER_REFUSED)}
    for s in servers.values():
        s.start()
    ftp = ConnectionRecorder(REFUSED)
    yield {**servers, "ftp": ftp}
    ftp.close()
    for s in servers.values():
        s.stop()


def refused_targets(ep) -> dict:
    """Where a redirect from the allowed host must not lead: name -> target URL."""
    port, other, ftp = ep["refused"].server_address[1], ep["other_refused"].server_address[1], ep["ftp"].port
    targets = {f"numeric {h}": f"http://{h}:{port}/img/0/1.jpg" for h in NUMERIC_LOOPBACK}
    targets.update({
        "loopback": f"http://127.0.0.1:{port}/img/0/1.jpg", "localhost": f"http://localhost:{port}/img/0/1.jpg",
        "scheme-relative": f"//127.0.0.1:{port}/img/0/1.jpg", "other refused": f"http://127.0.0.3:{other}/img/0/1.jpg",
        "ftp": f"ftp://127.0.0.1:{ftp}/pub/x.jpg", "gopher": f"gopher://127.0.0.1:{ftp}/1",
        "file": "file:///etc/passwd", "data": "data:image/png;base64,iVBORw0KGgo=", "javascript": "javascript:alert(1)",
        "https refused": f"https://127.0.0.1:{port}/img/0/1.jpg",
    })
    return targets


def hostile_rows(ep) -> list:
    """(kind, url, caption, expected reason) for every hostile case; None: kept."""
    a = ep["allowed"].base_url
    port = ep["refused"].server_address[1]
    rows = [(f"ok {i}", f"{a}/img/0/{i}.jpg", None, KEPT) for i in range(4)]
    rows += [(f"redirect to {name}", f"{a}/to?u={quote(t, safe='')}", None, REDIRECT_REFUSED)
             for name, t in refused_targets(ep).items()]
    rows += [
        ("redirect to allowed", f"{a}/to?u={quote(f'{a}/img/0/10.jpg', safe='')}", None, KEPT),
        ("redirect chain within limit", f"{a}/chain/{MAX_REDIRECTS}/0/11.jpg", None, KEPT),
        ("redirect chain over limit", f"{a}/chain/{MAX_REDIRECTS + 1}/0/12.jpg", None, "too_many_redirects"),
        ("redirect loop", f"{a}/loop/a", None, "redirect_loop"),
        ("huge body", f"{a}/huge/200/0/13.jpg", None, BODY_TOO_LARGE),
        ("declared huge body", f"{a}/declared/209715200/0/14.jpg", None, BODY_TOO_LARGE),
        ("drip 90 s", f"{a}/drip/90/0/15.jpg", None, DEADLINE),
        ("endless drip", f"{a}/drip/inf/0/16.jpg", None, DEADLINE),
        ("dripping headers", f"{a}/drip_headers/0.5", None, DEADLINE),
        ("slow first byte", f"{a}/slow/{TIMEOUT_S + 1}/0/17.jpg", None, "timeout"),
        ("404", f"{a}/status/404/x", None, "http_404"),
        ("403", f"{a}/status/403/x", None, "http_4xx"),
        ("500", f"{a}/status/500/x", None, "http_5xx"),
        ("503", f"{a}/status/503/x", None, "http_5xx"),
        ("refused connection", f"http://{ALLOWED}:9/x.jpg", None, "connection_error"),
        ("png bomb", f"{a}/bomb.png", None, "image_too_many_pixels"),
        ("zero bytes", f"{a}/empty/x", None, "image_empty"),
        ("truncated jpeg", f"{a}/truncated/0/18.jpg", None, "image_undecodable"),
        ("localhost by name", f"http://localhost:{port}/img/0/1.jpg", None, "url_private"),  # resolve_hosts=false
        ("unescaped path", f"{a}/img/0/21.jpg?note=grüße und mehr", None, KEPT),
        ("control characters", f"{a}/img/0/19.jpg", "a red\x00 circle\x07 on\x85 the\x1b left", KEPT),
        ("bidi controls", f"{a}/img/0/20.jpg", f"a {BIDI}gpj.exe red circle\u202c\u2066 here\u2069", KEPT),
    ]
    rows += [(f"listed {h}", f"http://{h}:{port}/img/0/1.jpg", None, "url_private") for h in NUMERIC_LOOPBACK]
    rows += [(f"listed {s}", u, None, "url_invalid") for s, u in [
        ("file", "file:///etc/passwd"), ("gopher", f"gopher://127.0.0.2:{ep['ftp'].port}/1"),
        ("ftp", "ftp://127.0.0.2/x.jpg"), ("data", "data:image/png;base64,iVBORw0KGgo="),
        ("javascript", "javascript:alert(1)")]]
    return rows


def write_csv_with_trailing_commas(path, rows) -> None:
    """The list as CSV whose rows all end with an extra comma (a common export quirk)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=",\n")
    writer.writerow(["url", "caption", "kind"])
    for i, (kind, url, caption, _) in enumerate(rows):
        writer.writerow([url, caption or synthetic.indexed_sample(0, 1000 + i)[2], kind])
    path.write_text(buf.getvalue().replace("url,caption,kind,\n", "url,caption,kind\n", 1), encoding="utf-8")


def overrides(d, extra=()):
    return [f"input.path={d / 'urls.csv'}", f"output.dir={d / 'out'}", "input.language_col=''",
            "input.extra_cols=[kind]",
            "text.allow_private_networks=false", f"text.allowed_networks=[{ALLOWED}/32]", "text.resolve_hosts=false",
            "text.languages=[]", "text.min_confidence=0", "text.min_words=1", "text.min_chars=1",
            f"download.timeout={TIMEOUT_S}", f"download.deadline={DEADLINE_S}", f"download.max_bytes={MAX_BYTES}",
            f"download.max_redirects={MAX_REDIRECTS}", "download.processes=1", "download.threads=64",
            "image.phash_threshold=-1", "balance.mode=none", "output.plots=false", *extra]


def shard_samples(out) -> dict:
    """row -> (jpg bytes, txt, json) of every sample in the output shards."""
    samples = {}
    for shard in load_manifest(out).shards:
        with tarfile.open(out / shard.path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name in files:
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(files[name])
                samples[meta["row"]] = (files[f"{key}.jpg"], files[f"{key}.txt"].decode(), meta)
    return samples


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, endpoints):
    d = tmp_path_factory.mktemp("hostile")
    rows = hostile_rows(endpoints)
    write_csv_with_trailing_commas(d / "urls.csv", rows)
    t0 = time.perf_counter()
    out = curate(load_curation_config("demo", overrides(d)))
    outcome = load_outcomes(out).set_index("row")["reason"]
    got = {kind: outcome[i] if isinstance(outcome[i], str) else KEPT for i, (kind, *_) in enumerate(rows)}
    return {"dir": d, "out": out, "rows": rows, "got": got, "seconds": time.perf_counter() - t0,
            "stats": json.loads((out / "stats.json").read_text()), "samples": shard_samples(out)}


def test_each_hostile_row_ends_with_its_reason(hostile):
    want = {kind: reason for kind, _, _, reason in hostile["rows"]}
    assert hostile["got"] == want
    assert set(want.values()) - {KEPT} <= set(DROP_REASONS)


def test_no_refused_endpoint_saw_a_connection(hostile, endpoints):
    assert endpoints["refused"].connections == [] and endpoints["refused"].requests == []
    assert endpoints["other_refused"].connections == []
    assert endpoints["ftp"].connections == []
    assert endpoints["allowed"].requests  # the allowed host did serve the run


def test_nothing_over_the_byte_cap_or_past_the_deadline_reaches_a_shard(hostile, endpoints):
    kept = {i for i, (*_, reason) in enumerate(hostile["rows"]) if reason is KEPT}
    assert set(hostile["samples"]) == kept
    assert all(len(jpg) <= MAX_BYTES for jpg, _, _ in hostile["samples"].values())
    sent = endpoints["allowed"].sent
    # The 200 MB body was cut after about the cap (plus what the kernel buffers), not read to its end.
    assert MAX_BYTES < sent["/huge/200/0/13.jpg"] < 32 * MAX_BYTES
    # The drips were cut at the deadline: about one piece per second, never their full length.
    assert sent["/drip/90/0/15.jpg"] <= 100 * (DEADLINE_S + 3)
    assert sent["/drip/inf/0/16.jpg"] <= 100 * (DEADLINE_S + 3)


def test_kept_rows_record_the_url_their_bytes_came_from(hostile, endpoints):
    a = endpoints["allowed"].base_url
    by_kind = {meta["kind"]: meta for _, _, meta in hostile["samples"].values()}
    assert by_kind["redirect to allowed"]["final_url"] == f"{a}/img/0/10.jpg"
    assert by_kind["redirect to allowed"]["url"].startswith(f"{a}/to?u=")
    assert by_kind["redirect chain within limit"]["final_url"] == f"{a}/img/0/11.jpg"
    assert by_kind["ok 0"]["final_url"] == by_kind["ok 0"]["url"] == f"{a}/img/0/0.jpg"


def test_stats_add_up_and_count_each_reason(hostile):
    stats, rows = hostile["stats"], hostile["rows"]
    assert stats["input_rows"] == len(rows)
    assert stats["kept"] + sum(stats["dropped"].values()) == len(rows) == stats["kept"] + stats["dropped_total"]
    outcomes = load_outcomes(hostile["out"])
    assert sorted(outcomes["row"]) == list(range(len(rows)))
    assert outcomes["reason"].value_counts().to_dict() == stats["dropped"]
    assert stats["dropped"][REDIRECT_REFUSED] == len([r for r in rows if r[3] == REDIRECT_REFUSED])


def test_captions_lose_control_and_bidi_characters_and_are_counted(hostile):
    texts = {meta["kind"]: txt for _, txt, meta in hostile["samples"].values()}
    assert texts["control characters"] == "a red circle on the left"  # NUL read whole, then removed, not cut
    assert texts["bidi controls"] == "a gpj.exe red circle here"
    assert all(BIDI not in t and "\x00" not in t for t in texts.values())
    assert hostile["stats"]["captions_cleaned"] == {"control_characters": 1, "bidi_controls": 1}


def test_slow_and_huge_urls_cost_one_deadline_not_their_length(tmp_path, endpoints):
    """5% endless drips and 5% 200 MB bodies among 100 URLs: each ends at its limit, the rest are kept."""
    a = endpoints["allowed"].base_url
    rows = []
    for i in range(100):
        if i % 20 == 3:
            rows.append((f"drip {i}", f"{a}/drip/inf/1/{i}.jpg", None, DEADLINE))
        elif i % 20 == 13:
            rows.append((f"huge {i}", f"{a}/huge/200/1/{i}.jpg", None, BODY_TOO_LARGE))
        else:
            rows.append((f"ok {i}", f"{a}/img/1/{i}.jpg", None, KEPT))
    write_csv_with_trailing_commas(tmp_path / "urls.csv", rows)
    t0 = time.perf_counter()
    out = curate(load_curation_config("demo", overrides(tmp_path, ["download.threads=32"])))
    seconds = time.perf_counter() - t0
    outcome = load_outcomes(out).set_index("row")["reason"]
    got = [r if isinstance(r, str) else KEPT for r in outcome.sort_index()]
    assert got == [r[3] for r in rows]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {DEADLINE: 5, BODY_TOO_LARGE: 5} and stats["kept"] == 90
    print(f"5%/5% hostile run: {seconds:.1f} s wall, download {stats['timing']['download_seconds']} s, "
          f"deadline {DEADLINE_S} s")


# ---- the policy itself, without a download ----

@pytest.mark.parametrize("host", NUMERIC_LOOPBACK + ["\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3"])
def test_numeric_and_unicode_spellings_of_loopback_are_refused_without_resolving(host):
    target = split_url(f"http://{host}:8080/x.jpg")
    assert target is not None
    verdict = host_verdicts([target.host], TextConfig(resolve_hosts=False))[target.host]
    if target.host == "localhost":  # a name: with resolve_hosts=false only the fetch gateway decides
        assert verdict is None and host_verdicts(["localhost"], TextConfig())["localhost"] == "url_private"
    else:
        assert verdict == "url_private", (host, target.host)
    assert normalize_host("2130706433") == normalize_host("0x7f.1") == "127.0.0.1"
    assert normalize_host("0") == "0.0.0.0" and normalize_host("bad host") is None


def test_a_pinned_address_cannot_be_rebound_between_check_and_connect(endpoints):
    """The name resolves to the allowed host once, then to a refused one: the fetch goes where it was checked."""
    answers = iter([ALLOWED] + [REFUSED] * 10)
    policy = UrlPolicy.from_networks(False, [f"{ALLOWED}/32"])
    fetcher = Fetcher(policy, FetchLimits(timeout=2, deadline=4),
                      resolver=lambda host: [ipaddress.ip_address(next(answers))])
    port = endpoints["allowed"].server_address[1]
    before = len(endpoints["refused"].connections)
    try:
        with fetcher.open(f"http://rebind.invalid:{port}/img/0/30.jpg") as opened:
            body = b"".join(opened.chunks())
        assert body[:2] == b"\xff\xd8"  # a JPEG, from the allowed host
        with pytest.raises(Refused) as e:  # the next lookup answers the refused address: refused, not contacted
            fetcher.open(f"http://rebind.invalid:{port}/img/0/31.jpg")
        assert e.value.reason == "url_private"
    finally:
        fetcher.close()
    assert len(endpoints["refused"].connections) == before


def test_a_hanging_dns_lookup_ends_at_the_deadline():
    fetcher = Fetcher(UrlPolicy(), FetchLimits(timeout=1, deadline=1), resolver=lambda host: time.sleep(5) or [])
    t0 = time.perf_counter()
    try:
        with pytest.raises(Refused) as e:
            fetcher.open("http://slow-dns.example/x.jpg")
    finally:
        fetcher.close()
    assert e.value.reason == DEADLINE and time.perf_counter() - t0 < 3


def test_caption_normalisation_strips_bidi_and_c1_controls():
    assert normalize_caption(f"abc{BIDI}def\u2067x\u2069 \u200fy\x9b") == "abcdefx y"


# ---- URL lists that used to end in a traceback or silent corruption ----

def _input(path, *extra):
    return load_curation_config("default", [f"input.path={path}", "output.dir=out", *extra]).input


def test_corrupt_and_truncated_gzip_lists_are_one_line_errors(tmp_path, capsys):
    good = gzip.compress(b"url,caption\n" + b"".join(b"http://a.example/%d.jpg,a red circle %d\n" % (i, i)
                                                     for i in range(2000)))
    (tmp_path / "truncated.csv.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.csv.gz").write_bytes(good[:20] + bytes(b ^ 0x5A for b in good[20:200]) + good[200:])
    for name, cause in (("truncated.csv.gz", "EOFError"), ("corrupt.csv.gz", "zlib.error")):
        with pytest.raises(CurationError, match=rf"cannot read URL list .*{name} as csv \({cause}: .*\); the file is "
                                                r"damaged or not in that format: re-create or re-download it"):
            read_all(_input(tmp_path / name))
    assert main(["curate", "--config", "default", f"input.path={tmp_path / 'corrupt.csv.gz'}",
                 f"output.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zlib.error" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_jsonl_captions_of_mixed_types_are_an_error_naming_the_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"url": "http://a.example/1.jpg", "caption": "a red circle"}\n'
                    '{"url": "http://a.example/2.jpg", "caption": 5}\n')
    message = (r"mixed.jsonl: column 'caption' holds a value of type int \('5', record 2\) where text is expected; "
               r"write every caption as a string")
    with pytest.raises(CurationError, match=message):
        read_all(_input(path))


def test_csv_rows_with_a_trailing_comma_and_a_nul_in_a_caption_read_whole(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text('url,caption\nhttp://a.example/1.jpg,"two\x00 words",\nhttp://a.example/2.jpg,plain,\n')
    df = read_all(_input(path))
    assert df["url"].tolist() == ["http://a.example/1.jpg", "http://a.example/2.jpg"]
    assert df["caption"].tolist() == ["two\x00 words", "plain"]
    path.write_text("url,caption\nhttp://a.example/1.jpg,a red, round circle\n")  # an unquoted comma
    with pytest.raises(CurationError, match=r"urls.csv has a row with 3 fields where its header has 2 .*quote fields"):
        read_all(_input(path))


def test_missing_columns_and_truncated_parquet_are_errors_naming_file_and_fix(tmp_path):
    pd.DataFrame({"link": ["http://a.example/1.jpg"], "caption": ["x"]}).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(CurationError, match=r"cols.parquet has no column\(s\) \['url'\] .*set input.url_col"):
        read_all(_input(tmp_path / "cols.parquet"))
    pd.DataFrame({"url": ["http://a.example/1.jpg"] * 500, "caption": ["x"] * 500}).to_parquet(tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(CurationError, match=r"cannot read URL list .*t.parquet as parquet \(.*\); the file is damaged"):
        read_all(_input(tmp_path / "t.parquet"))


@pytest.mark.parametrize("override, message", [
    ("download.deadline=0", "download.deadline=0.0 must be positive"),
    ("download.max_bytes=0", "download.max_bytes=0 must be positive"),
    ("download.max_redirects=-1", "download.max_redirects=-1 must be >= 0 (0: none)"),
    ("text.refused_networks=[10.0.0.300/8]", "text.refused_networks entry '10.0.0.300/8' is not a CIDR network"),
])
def test_budget_and_network_settings_are_checked_before_any_work(override, message):
    with pytest.raises(ConfigError) as e:
        load_curation_config("default", ["input.path=u", "output.dir=o", override])
    assert message in str(e.value)


def test_refused_networks_win_over_public_and_allowed_addresses():
    policy = TextConfig(allowed_networks=["127.0.0.0/8"], refused_networks=["127.0.0.3/32", "8.8.8.0/24"],
                        resolve_hosts=False)
    assert host_verdicts(["127.0.0.2", "127.0.0.3", "8.8.8.8", "1.1.1.1"], policy) == {
        "127.0.0.2": None, "127.0.0.3": "url_private", "8.8.8.8": "url_private", "1.1.1.1": None}
