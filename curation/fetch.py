"""Fetch URLs under the URL policy, a byte cap and a deadline; and the loopback gateway img2dataset fetches through.

:class:`Fetcher` follows a URL hop by hop. Each hop's host goes through ``url_policy.host_verdict``
after DNS resolution and the connection is made to exactly the addresses that were checked (a
name whose DNS answer changes between check and connect cannot rebind it); only http(s) is spoken,
redirects are followed by this code (at most ``max_redirects``, a repeated URL is a loop), the body
is counted against ``max_bytes`` while it streams (a larger declared Content-Length is refused
before any body is read), and one deadline bounds resolution, connects and every read of all hops
and retries: a watchdog thread shuts the socket down when it passes, so a server that drips
headers or body cannot hold a fetch longer.

:class:`FetchGateway` serves ``/<secret>/<row>`` on 127.0.0.1: it fetches that row's URL with a
Fetcher and streams the body back chunked, so img2dataset (``download.py``) only ever connects
to loopback. A refusal before the body becomes a 502; one during the body ends the response
without its last chunk, which urllib reports as an incomplete read. Either way the gateway records
the row's reason and final URL, and those records, not img2dataset's error text, classify it.
"""
from __future__ import annotations

import heapq
import http.client
import itertools
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import quote, urljoin, urlsplit

from sigscale.core.progress import Progress
from sigscale.curation.url_policy import (
    URL_INVALID, URL_PRIVATE, URL_UNRESOLVABLE, IPAddress, Resolver, Target, UrlPolicy, host_verdict, resolve,
    split_url,
)

# Drop reasons a fetch can end with (the gateway records them per row).
REDIRECT_REFUSED = "redirect_refused"  # a redirect to a non-http(s) URL or a host the policy refuses
REDIRECT_LOOP = "redirect_loop"  # a redirect back to a URL already visited
TOO_MANY_REDIRECTS = "too_many_redirects"
REDIRECT_ERROR = "redirect_error"  # a 3xx without a usable Location
BODY_TOO_LARGE = "body_too_large"
DEADLINE = "deadline"  # download.deadline passed (all hops, connects, reads and retries together)
TIMEOUT = "timeout"  # one connect or read waited download.timeout
CONNECTION_ERROR = "connection_error"  # refused, reset, TLS or protocol failure, body shorter than declared
HTTP_404 = "http_404"
HTTP_4XX = "http_4xx"
HTTP_5XX = "http_5xx"
FETCH_REASONS = (URL_INVALID, URL_PRIVATE, URL_UNRESOLVABLE, REDIRECT_REFUSED, REDIRECT_LOOP, TOO_MANY_REDIRECTS,
                 REDIRECT_ERROR, BODY_TOO_LARGE, DEADLINE, TIMEOUT, CONNECTION_ERROR, HTTP_404, HTTP_4XX, HTTP_5XX)
RETRYABLE = (TIMEOUT, CONNECTION_ERROR, HTTP_5XX)
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16
_PATH_SAFE = "!#$%&'()*+,-./:;=?@[]~_"


@dataclass(frozen=True)
class FetchLimits:
    """Per-URL budget: ``timeout`` per connect or read, ``deadline`` for everything, body and hop caps."""

    timeout: float = 10.0
    deadline: float = 30.0
    max_bytes: int = 32 << 20
    max_redirects: int = 5
    retries: int = 0  # extra attempts after a timeout, connection error or 5xx, inside the same deadline


class Refused(Exception):
    """A fetch that ends without a body; ``reason`` is its drop reason, ``url`` the hop it ended at."""

    def __init__(self, reason: str, url: str = ""):
        super().__init__(reason)
        self.reason, self.url = reason, url


class _Guard:
    """One connection's deadline registration; ``fired`` tells a reader its end of file was the watchdog.

    It holds a duplicate of the socket's descriptor: shutting that down ends the connection for
    every descriptor of it, also after the original was wrapped in TLS (which detaches it).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock.dup()
        self.fired = False
        self.cancelled = False

    def cancel(self) -> None:
        """The connection is done with: never shut it down, free the duplicate now."""
        self.cancelled = True
        self.sock.close()


class _Watchdog:
    """One thread that shuts down sockets whose deadline has passed, waking any read blocked on them."""

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, _Guard]] = []
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._stopped = False
        threading.Thread(target=self._run, name="sigscale-fetch-watchdog", daemon=True).start()

    def stop(self) -> None:
        """End the thread; sockets still registered are left to their owners."""
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def watch(self, when: float, sock: socket.socket) -> _Guard:
        """Shut ``sock``'s connection down at monotonic time ``when`` unless the guard is cancelled first."""
        guard = _Guard(sock)
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._ids), guard))
            self._cv.notify()
        return guard

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, guard = heapq.heappop(self._heap)
            if guard.cancelled:
                continue
            guard.fired = True
            try:
                guard.sock.shutdown(socket.SHUT_RDWR)  # a read blocked on the connection returns at once
            except OSError:  # cancelled meanwhile
                pass
            guard.sock.close()


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a checked address, speaking to ``target.host`` (Host header, TLS SNI)."""

    def __init__(self, target: Target, address: IPAddress, timeout: float, tls: Optional[ssl.SSLContext],
                 watch: Callable[[socket.socket], _Guard]):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address, self._tls, self._watch = str(address), tls, watch
        self.guard: Optional[_Guard] = None

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.guard = self._watch(sock)  # before the TLS handshake, which a server can drip as well
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host) if self._tls else sock


class Opened:
    """A final 2xx response whose body is still to be read through :meth:`chunks`."""

    def __init__(self, fetcher: "Fetcher", url: str, hop: "_Hop", deadline: float):
        self.final_url, self.headers = url, hop.resp.headers
        self._fetcher, self._hop, self._deadline = fetcher, hop, deadline

    def chunks(self) -> Iterator[bytes]:
        """The body piece by piece; raises :class:`Refused` past the byte cap or deadline, or on a cut."""
        limits, hop, total = self._fetcher.limits, self._hop, 0
        try:
            while True:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise Refused(DEADLINE, self.final_url)
                hop.sock.settimeout(min(limits.timeout, remaining))
                chunk = hop.resp.read1(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > limits.max_bytes:
                    raise Refused(BODY_TOO_LARGE, self.final_url)
                yield chunk
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise Refused(_failure(e, hop.guard, self._deadline), self.final_url) from None
        if hop.guard.fired or time.monotonic() > self._deadline:
            raise Refused(DEADLINE, self.final_url)  # the watchdog's shutdown reads as an end of file
        if total < (_declared_length(hop.resp) or 0):
            raise Refused(CONNECTION_ERROR, self.final_url)  # http.client's read1 returns short bodies silently

    def close(self) -> None:
        """Release the connection (and its deadline registration)."""
        self._hop.close()

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Hop:
    """One request's connection: its socket (http.client lets go of it once the response owns it), response, guard."""

    conn: _PinnedConnection
    sock: socket.socket
    resp: http.client.HTTPResponse
    guard: _Guard

    def close(self) -> None:
        self.guard.cancel()
        self.resp.close()
        self.conn.close()
        self.sock.close()


def _declared_length(resp: http.client.HTTPResponse) -> Optional[int]:
    """The largest Content-Length the response declares (a hostile server may send several), or None."""
    values = [v.strip() for h in resp.headers.get_all("Content-Length") or () for v in h.split(",")]
    lengths = [int(v) for v in values if v.isdigit()]
    return max(lengths) if lengths else None


def _failure(error: BaseException, guard: Optional[_Guard], deadline: float) -> str:
    """Drop reason of a connect/read exception: the deadline if it has passed, else timeout or connection."""
    if (guard is not None and guard.fired) or time.monotonic() >= deadline:
        return DEADLINE
    return TIMEOUT if isinstance(error, TimeoutError) else CONNECTION_ERROR


def _status_reason(status: int) -> Optional[str]:
    if 200 <= status < 300:
        return None
    if status < 400:
        return REDIRECT_ERROR  # a 3xx we cannot follow (redirects were handled before)
    return HTTP_404 if status == 404 else (HTTP_4XX if status < 500 else HTTP_5XX)


class Fetcher:
    """Opens URLs under a :class:`UrlPolicy` and :class:`FetchLimits`; thread-safe, one per download run."""

    def __init__(self, policy: UrlPolicy, limits: FetchLimits, resolver: Resolver = resolve, dns_threads: int = 64):
        self.policy, self.limits, self._resolver = policy, limits, resolver
        self._tls = ssl.create_default_context()
        self._dns = ThreadPoolExecutor(dns_threads, thread_name_prefix="sigscale-dns")
        self._watchdog = _Watchdog()

    def close(self) -> None:
        """Stop the watchdog and DNS threads (a lookup stuck in the OS resolver is left to finish on its own)."""
        self._watchdog.stop()
        self._dns.shutdown(wait=False, cancel_futures=True)

    def open(self, url: str, headers: Optional[Mapping[str, str]] = None) -> Opened:
        """Follow ``url`` to a 2xx response within the limits; raises :class:`Refused` otherwise."""
        deadline = time.monotonic() + self.limits.deadline
        for attempt in range(self.limits.retries + 1):
            try:
                return self._follow(url, dict(headers or {}), deadline)
            except Refused as r:
                if r.reason not in RETRYABLE or attempt == self.limits.retries or time.monotonic() >= deadline:
                    raise
        raise AssertionError("unreachable")

    def _lookup(self, deadline: float) -> Resolver:
        def lookup(host: str) -> List[IPAddress]:
            try:  # getaddrinfo has no timeout of its own
                return self._dns.submit(self._resolver, host).result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise Refused(DEADLINE) from None
        return lookup

    def _follow(self, url: str, headers: Dict[str, str], deadline: float) -> Opened:
        seen = set()
        for redirects in range(self.limits.max_redirects + 1):
            target = split_url(url)
            if target is None:
                raise Refused(REDIRECT_REFUSED if redirects else URL_INVALID, url)
            if url in seen:
                raise Refused(REDIRECT_LOOP, url)
            seen.add(url)
            try:
                reason, addresses = host_verdict(target.host, self.policy, self._lookup(deadline))
            except Refused as r:
                raise Refused(r.reason, url) from None
            if reason:
                raise Refused(REDIRECT_REFUSED if redirects and reason == URL_PRIVATE else reason, url)
            hop = self._request(target, url, addresses, headers, deadline)
            status = hop.resp.status
            if status in REDIRECTS:
                location = hop.resp.getheader("Location")
                hop.close()
                if not location:
                    raise Refused(REDIRECT_ERROR, url)
                url = urljoin(url, location.strip())
                continue
            reason = _status_reason(status)
            declared = _declared_length(hop.resp)
            if reason is None and declared is not None and declared > self.limits.max_bytes:
                reason = BODY_TOO_LARGE
            if reason:
                hop.close()
                raise Refused(reason, url)
            return Opened(self, url, hop, deadline)
        raise Refused(TOO_MANY_REDIRECTS, url)

    def _request(self, target: Target, url: str, addresses: List[IPAddress], headers: Dict[str, str],
                 deadline: float) -> _Hop:
        """GET ``url`` from the first of ``addresses`` that answers; nothing else is ever connected to."""
        parts = urlsplit(url)
        # Lists carry unescaped spaces and non-ASCII in paths; escape them as browsers do (existing %xx stay).
        path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_PATH_SAFE)
        reason = CONNECTION_ERROR
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Refused(DEADLINE, url)
            conn = _PinnedConnection(target, address, min(self.limits.timeout, remaining),
                                     self._tls if target.scheme == "https" else None,
                                     lambda sock: self._watchdog.watch(deadline, sock))
            try:
                conn.connect()
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                reason = _failure(e, conn.guard, deadline)
                if conn.guard:
                    conn.guard.cancel()
                conn.close()
                continue
            sock, guard = conn.sock, conn.guard
            try:
                conn.request("GET", path, headers={**headers, "Connection": "close"})
                return _Hop(conn, sock, conn.getresponse(), guard)
            except (OSError, http.client.HTTPException, ValueError) as e:
                guard.cancel()
                conn.close()
                sock.close()
                raise Refused(_failure(e, guard, deadline), url) from None
        raise Refused(reason, url)


class _GatewayHandler(BaseHTTPRequestHandler):
    server: "FetchGateway"
    protocol_version = "HTTP/1.1"  # chunked responses: a cut body is then an error, not a short image

    def log_message(self, *args) -> None:  # one line per image would drown the curation log
        pass

    def _reply_error(self, status: int, why: str) -> None:
        self.send_response(status, f"sigscale {why}")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def do_GET(self) -> None:
        self.close_connection = True
        secret, _, row = self.path.strip("/").partition("/")
        url = self.server.urls.get(int(row)) if secret == self.server.secret and row.isdigit() else None
        if url is None:
            return self._reply_error(404, "unknown row")
        record = self.server.record
        try:
            agent = self.headers.get("User-Agent")  # img2dataset's, with its user_agent_token
            opened = self.server.fetcher.open(url, {"User-Agent": agent} if agent else {})
        except Refused as r:
            record(int(row), r.reason, r.url or url)
            return self._reply_error(502, r.reason)
        with opened:
            self.send_response(200)
            self.send_header("Content-Type", opened.headers.get("Content-Type", "application/octet-stream"))
            for value in opened.headers.get_all("X-Robots-Tag") or ():  # img2dataset's robots check reads these
                self.send_header("X-Robots-Tag", value)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for chunk in opened.chunks():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except Refused as r:  # no last chunk: urllib raises IncompleteRead, the row is not kept
                record(int(row), r.reason, opened.final_url)
                return
            except OSError:  # img2dataset stopped reading (its X-Robots-Tag check); its own result decides
                pass
            record(int(row), None, opened.final_url)


class FetchGateway(ThreadingHTTPServer):
    """Serves ``/<secret>/<row>`` on 127.0.0.1 by fetching ``urls[row]``; ``outcomes[row]`` = (reason, final URL)."""

    daemon_threads = True
    request_queue_size = 1024  # img2dataset opens processes x threads connections at once

    def __init__(self, urls: Mapping[int, str], fetcher: Fetcher):
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        self.urls: Dict[int, str] = dict(urls)
        self.fetcher = fetcher
        self.secret = secrets.token_urlsafe(16)  # only this run's rows, and only for whoever was told the URLs
        self.outcomes: Dict[int, Tuple[Optional[str], str]] = {}
        self.progress: Optional[Progress] = None  # counts URLs done, for the download's progress lines
        self._thread: Optional[threading.Thread] = None

    def record(self, row: int, reason: Optional[str], final_url: str) -> None:
        """The outcome of ``row`` (None: the body was served), counted in ``progress`` when one is set."""
        self.outcomes[row] = (reason, final_url)
        if self.progress is not None:
            self.progress.update()

    def url_for(self, row: int) -> str:
        """The loopback URL img2dataset is given for ``row``."""
        return f"http://127.0.0.1:{self.server_address[1]}/{self.secret}/{int(row)}"

    def __enter__(self) -> "FetchGateway":
        self._thread = threading.Thread(target=self.serve_forever, name="sigscale-fetch-gateway", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self.fetcher.close()
