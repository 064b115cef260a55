"""A loopback HTTP server of generated images and broken responses, plus URL lists that point at it.

Tests and the demo curate from 127.0.0.1 with the real img2dataset. Paths name what comes back:

    /img/<seed>/<i>.jpg          the generated image of sample i (synthetic.indexed_sample)
    /near/<seed>/<i>.jpg?copy=k  the same image resized slightly and re-encoded: a near-duplicate
    /status/<code>/...           that HTTP status          /html/...      an HTML page
    /truncated/<seed>/<i>.jpg    the first half of the JPEG /empty/...     a 200 with no body
    /garbage/...                 random bytes as image/jpeg /bomb.png      a 40000x40000 PNG (194 kB)
    /big|tiny|wide/<seed>/<i>.jpg  the image at 1024 px, 16 px, or 256x32
    /redirect/<seed>/<i>.jpg     302 to /img/...            /loop/a        302 a -> b -> a ...
    /slow/<s>/<seed>/<i>.jpg     waits s seconds before answering
    /trickle/<s>/<seed>/<i>.jpg  sends the image in pieces spread over s seconds
    /noai/<seed>/<i>.jpg         the image with "X-Robots-Tag: noai"

Hostile responses (``download.deadline``, ``download.max_bytes`` and the URL policy must stop them):

    /to?u=<url>                  302 to any URL (another host, ftp://, file://, a numeric loopback spelling)
    /chain/<n>/<seed>/<i>.jpg    n redirects in a row, then the image
    /huge/<mb>/<seed>/<i>.jpg    the image followed by zeros up to mb MB, no Content-Length
    /declared/<bytes>/...        declares Content-Length: bytes, sends the image
    /drip/<s>/<seed>/<i>.jpg     the image then zeros, one piece a second for s seconds ("inf": forever)
    /drip_headers/<s>            status line, then the headers one byte every s seconds, forever

The server records every connection it accepts (``connections``), every request path
(``requests``) and the body bytes it got out per path (``sent``), so a test can show that a host
the policy refuses was never contacted and that a refused body was not read to its end.
"""
from __future__ import annotations

import io
import itertools
import random
import struct
import threading
import time
import zlib
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlsplit

import pandas as pd
from PIL import Image

from sigscale.curation import synthetic

# Broken URLs of a generated list, by share of all broken ones, and the drop reason each must end with.
BROKEN_KINDS: Dict[str, Tuple[float, str]] = {
    "http_404": (0.6, "http_404"), "http_500": (0.15, "http_5xx"), "html": (0.1, "image_undecodable"),
    "truncated": (0.1, "image_undecodable"), "empty": (0.05, "image_empty"),
}


@lru_cache(maxsize=1)
def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid 1-bit PNG of width x height zeros: tiny on the wire, 1.6 Gpx once decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_duplicate(img: Image.Image) -> Image.Image:
    """The same picture a little smaller and re-encoded, as a re-upload elsewhere would be."""
    w, h = img.size
    return Image.open(io.BytesIO(_jpeg(img.resize((w - w // 16, h - h // 16), Image.BICUBIC), 80)))


class _Handler(BaseHTTPRequestHandler):
    server: "ImageServer"

    def log_message(self, *args) -> None:  # keep test and demo output readable
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: Optional[dict] = None,
              trickle: float = 0.0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if trickle and body:
            pieces = 4
            step = -(-len(body) // pieces)
            for k in range(0, len(body), step):
                self.wfile.write(body[k:k + step])
                self.wfile.flush()
                time.sleep(trickle / pieces)
        else:
            self.wfile.write(body)

    def _stream(self, pieces: Iterable[bytes], delay: float = 0.0) -> None:
        """A 200 whose body ends when the connection closes (no Content-Length), sent piece by piece."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(piece)
            self.server.count_sent(self.path, len(piece))
            if delay:
                time.sleep(delay)

    def _drip_headers(self, every: float) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for byte in itertools.cycle(b"X-Drip: 0\r\n"):
            time.sleep(every)
            self.wfile.write(bytes([byte]))

    def _hostile(self, kind: str, rest: List[str]) -> bool:
        """Serve one of the hostile paths; False when ``kind`` is not one."""
        if kind == "to":
            target = parse_qs(urlsplit(self.path).query).get("u", [""])[0]
            # Sent as raw UTF-8, as a careless or hostile server would; http.client reads it as Latin-1.
            self._send(302, b"", "text/html", {"Location": target.encode("utf-8").decode("latin-1")})
        elif kind == "chain":
            n = int(rest[0])
            self._send(302, b"", "text/html",
                       {"Location": f"/chain/{n - 1}/" + "/".join(rest[1:]) if n > 1 else "/img/" + "/".join(rest[1:])})
        elif kind == "huge":
            head, block = _jpeg(self._image(*rest[1:])), bytes(1 << 20)
            self._stream(itertools.chain([head], itertools.repeat(block, int(float(rest[0])))))
        elif kind == "declared":
            self._send(200, _jpeg(self._image(*rest[1:])), headers={"Content-Length": rest[0]})
        elif kind == "drip":
            pieces = itertools.count() if rest[0] == "inf" else range(int(float(rest[0])))
            head = _jpeg(self._image(*rest[1:]))
            self._stream(itertools.chain([head[:100]], (bytes(100) for _ in pieces)), delay=1.0)
        elif kind == "drip_headers":
            self._drip_headers(float(rest[0]))
        else:
            return False
        return True

    def _image(self, seed: str, name: str, size: Optional[int] = None) -> Image.Image:
        scene = synthetic.indexed_sample(int(seed), int(Path(name).stem))[0]
        return synthetic.render(scene, size or self.server.size)

    def do_GET(self) -> None:
        parts = urlsplit(self.path).path.strip("/").split("/")
        kind, rest = parts[0], parts[1:]
        self.server.requests.append(self.path)
        try:
            if self._hostile(kind, rest):
                return None
            if kind == "img":
                return self._send(200, _jpeg(self._image(*rest)))
            if kind == "near":
                return self._send(200, _jpeg(near_duplicate(self._image(*rest)), 85))
            if kind == "status":
                return self._send(int(rest[0]), b"<html>error</html>", "text/html")
            if kind == "html":
                return self._send(200, b"<!doctype html><html><body><img src='x.jpg'></body></html>", "text/html")
            if kind == "truncated":
                data = _jpeg(self._image(*rest))
                return self._send(200, data[: len(data) // 2])
            if kind == "empty":
                return self._send(200, b"")
            if kind == "garbage":
                return self._send(200, random.Random(self.path).randbytes(5000))
            if kind == "bomb.png":
                return self._send(200, png_bomb(), "image/png")
            if kind == "big":
                return self._send(200, _jpeg(self._image(*rest, size=1024)))
            if kind == "tiny":
                return self._send(200, _jpeg(self._image(*rest, size=16)))
            if kind == "wide":
                return self._send(200, _jpeg(self._image(*rest).resize((256, 32))))
            if kind == "redirect":
                return self._send(302, b"", "text/html", {"Location": "/img/" + "/".join(rest)})
            if kind == "loop":
                return self._send(302, b"", "text/html", {"Location": "/loop/" + ("b" if rest[0] == "a" else "a")})
            if kind == "slow":
                time.sleep(float(rest[0]))
                return self._send(200, _jpeg(self._image(*rest[1:])))
            if kind == "trickle":
                return self._send(200, _jpeg(self._image(*rest[1:])), trickle=float(rest[0]))
            if kind == "noai":
                return self._send(200, _jpeg(self._image(*rest)), headers={"X-Robots-Tag": "noai"})
        except (ValueError, TypeError, IndexError):
            return self._send(400, b"bad path", "text/plain")
        except ConnectionError:  # the client gave up (a timeout, a refused body): nothing to answer
            return None
        return self._send(404, b"not found", "text/plain")


class ImageServer(ThreadingHTTPServer):
    """Serves the paths above on a loopback address (port 0: any free one) from a daemon thread."""

    daemon_threads = True
    # img2dataset opens dozens of connections at once; the default backlog of 5 makes some of
    # them wait for a timeout instead of an answer.
    request_queue_size = 1024

    def __init__(self, size: int = 64, port: int = 0, host: str = "127.0.0.1"):
        super().__init__((host, port), _Handler)
        self.size = size
        self.connections: List[Tuple[str, int]] = []
        self.requests: List[str] = []
        self.sent: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def verify_request(self, request, client_address) -> bool:
        self.connections.append(client_address)  # before any byte is read: a contact, even without a request
        return True

    def count_sent(self, path: str, n: int) -> None:
        """Add ``n`` body bytes sent for ``path``."""
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + n

    def start(self) -> "ImageServer":
        png_bomb()  # built once up front (~0.5 s), so serving it cannot outlast a client's timeout
        self._thread = threading.Thread(target=self.serve_forever, name="sigscale-image-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def edge_cases(base_url: str, seed: int = 0, slow_seconds: float = 3.0, trickle_seconds: float = 1.6) -> List[dict]:
    """One row per hard case of a real URL list, with the drop reason it must end with (None: kept).

    ``slow_seconds`` must exceed the download timeout and ``trickle_seconds / 4`` stay below it:
    img2dataset's timeout is per socket read, so a trickle that keeps sending is not cut off.
    """
    def row(kind: str, url: Optional[str], index: int, expect: Optional[str], text: Optional[str] = "") -> dict:
        scene, lang, cap = synthetic.indexed_sample(seed, index)
        return {"url": url, "caption": cap if text == "" else text, "language": lang,
                "class": scene.class_name, "kind": kind, "expect": expect}

    b, s = base_url, seed
    base = 10_000_000  # indices no generated list of this seed uses for its own rows
    return [
        row("null_caption", f"{b}/img/{s}/{base}.jpg", base, "caption_empty", None),
        row("whitespace_caption", f"{b}/img/{s}/{base + 1}.jpg", base + 1, "caption_empty", " \t\n"),
        row("exact_duplicate_a", f"{b}/img/{s}/{base + 2}.jpg", base + 2, None),
        row("exact_duplicate_b", f"{b}/img/{s}/{base + 2}.jpg", base + 2, "duplicate_url_caption"),
        row("ftp", f"ftp://127.0.0.1/{base + 3}.jpg", base + 3, "url_invalid"),
        row("no_url", None, base + 4, "url_invalid"),
        row("private", f"http://10.1.2.3/{base + 5}.jpg", base + 5, "url_private"),
        row("link_local", "http://169.254.169.254/latest/meta-data", base + 6, "url_private"),
        row("http_404", f"{b}/status/404/{base + 7}.jpg", base + 7, "http_404"),
        row("http_500", f"{b}/status/500/{base + 8}.jpg", base + 8, "http_5xx"),
        row("html", f"{b}/html/{base + 9}", base + 9, "image_undecodable"),
        row("truncated", f"{b}/truncated/{s}/{base + 10}.jpg", base + 10, "image_undecodable"),
        row("empty", f"{b}/empty/{base + 11}", base + 11, "image_empty"),
        row("garbage", f"{b}/garbage/{base + 12}", base + 12, "image_undecodable"),
        row("bomb", f"{b}/bomb.png?{base + 13}", base + 13, "image_too_many_pixels"),
        row("redirect", f"{b}/redirect/{s}/{base + 14}.jpg", base + 14, None),
        row("redirect_loop", f"{b}/loop/a?{base + 15}", base + 15, "redirect_loop"),
        row("slow", f"{b}/slow/{slow_seconds}/{s}/{base + 16}.jpg", base + 16, "timeout"),
        row("trickle", f"{b}/trickle/{trickle_seconds}/{s}/{base + 17}.jpg", base + 17, None),
        row("noai", f"{b}/noai/{s}/{base + 18}.jpg", base + 18, "robots_disallowed"),
        row("tiny", f"{b}/tiny/{s}/{base + 19}.jpg", base + 19, "image_too_small"),
        row("wide", f"{b}/wide/{s}/{base + 20}.jpg", base + 20, "image_aspect"),
        row("big", f"{b}/big/{s}/{base + 21}.jpg", base + 21, None),
        row("refused_port", f"http://127.0.0.1:9/{base + 22}.jpg", base + 22, "connection_error"),
    ]


def write_url_list(path: Path, n: int, base_url: str, seed: int = 0, broken: float = 0.05,
                   near_duplicates: float = 0.05, languages: Sequence[str] = synthetic.LANGUAGES,
                   with_edge_cases: bool = False) -> Path:
    """A parquet URL list of n generated samples on the server, some broken, some near-duplicates.

    Columns: url, caption, language (the true one), class, kind (ok, near_duplicate or a broken
    kind) and expect (the drop reason the row must end with; None for a sample that should be kept
    unless a later filter removes it). Near-duplicates copy an earlier sample's image under a new
    URL with a fresh caption of the same scene.
    """
    rng = random.Random(seed)
    kinds = list(BROKEN_KINDS)
    weights = [BROKEN_KINDS[k][0] for k in kinds]
    rows, originals = [], []
    for i in range(n):
        u = rng.random()
        scene, lang, cap = synthetic.indexed_sample(seed, i, languages)
        if u < broken:
            kind = rng.choices(kinds, weights)[0]
            path_part = {"http_404": f"status/404/{seed}/{i}.jpg", "http_500": f"status/500/{seed}/{i}.jpg",
                         "html": f"html/{seed}/{i}", "truncated": f"truncated/{seed}/{i}.jpg",
                         "empty": f"empty/{seed}/{i}"}[kind]
            rows.append({"url": f"{base_url}/{path_part}", "caption": cap, "language": lang,
                         "class": scene.class_name, "kind": kind, "expect": BROKEN_KINDS[kind][1]})
        elif u < broken + near_duplicates and originals:
            j = rng.choice(originals)
            scene_j = synthetic.indexed_sample(seed, j, languages)[0]
            lang = rng.choice(list(languages))
            rows.append({"url": f"{base_url}/near/{seed}/{j}.jpg?copy={i}",
                         "caption": synthetic.caption(scene_j, lang, rng.randrange(3)), "language": lang,
                         "class": scene_j.class_name, "kind": "near_duplicate", "expect": "near_duplicate"})
        else:
            originals.append(i)
            rows.append({"url": f"{base_url}/img/{seed}/{i}.jpg", "caption": cap, "language": lang,
                         "class": scene.class_name, "kind": "ok", "expect": None})
    if with_edge_cases:
        rows += edge_cases(base_url, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["url", "caption", "language", "class", "kind", "expect"]).to_parquet(path, index=False)
    return path
