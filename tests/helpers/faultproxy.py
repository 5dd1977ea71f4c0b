"""A fault-injecting HTTP proxy for S3 tests: a small threaded server in front of the real one.

It forwards requests unchanged (the Host header too, so SigV4 signatures still match), and
for a seeded random share of them answers 503 SlowDown, or cuts the connection halfway
through a body: the request's for uploads, the response's for downloads.

``delete_objects`` makes it answer DeleteObjects (POST ?delete) the way some servers do:
"require-md5" refuses a request without Content-MD5 with a 400 (older MinIO and Ceph, now
that boto3 >= 1.36 sends a CRC32 instead); "key-errors" answers 200 with an <Error> per key
and deletes nothing (a bucket policy that denies s3:DeleteObject, an object lock).

``bytes_per_second`` makes every upload share one link of that speed; ``stalled`` (an
Event) turns the endpoint into a black hole that never answers; ``stall_bodies_over`` (a
size in bytes, settable at any time) leaves only the requests with larger bodies
unanswered: a link too slow for checkpoints that still carries small JSON files.
``fail_everything`` and ``recover`` start and end an outage; ``cut_off`` starts a partition
instead (every connection is closed before any answer), which ``recover`` ends too.

``hold(pattern)`` keeps the requests whose "METHOD /path" matches the regex unanswered
until ``release()`` (then they go through): ``holding`` is set once one has arrived, so a
test can act while a chosen key is being stored.

``corrupt(pattern, times)`` flips a byte in the body of the next ``times`` GET answers
whose path matches, and drops their checksum headers: a server that serves damaged bytes
consistently with itself (bit rot at rest, a bad disk).

``lost_reply`` forwards a share of requests whole, so the server acts on them, then cuts
the connection before the reply: the client retries a request that already happened.

Two more uses: ``seen`` logs every request (time, method, path, headers, status), so a test
can count what a client sends; and ``strip_conditional`` plays a server that ignores
conditional writes: it drops If-Match/If-None-Match and signs the request again (they are
part of the SigV4 signature, which a real server checks).
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}
CONDITIONAL = {"if-match", "if-none-match"}


@dataclass(frozen=True)
class Seen:
    at: float  # time.time() when the request arrived
    method: str
    path: str
    headers: dict[str, str]  # lower-case names, as the client sent them
    status: int  # what the client got back (0: connection cut)


class FaultProxy:
    def __init__(self, upstream: str, *, slowdown: float = 0.0, drop: float = 0.0, seed: int = 0,
                 lost_reply: float = 0.0,
                 strip_conditional: tuple[str, str] | None = None,
                 delete_objects: str = "pass", refusal: str = "MissingContentMD5",
                 bytes_per_second: float | None = None) -> None:
        assert delete_objects in ("pass", "require-md5", "key-errors"), delete_objects
        self.upstream = urlsplit(upstream)
        self.slowdown, self.drop, self.lost_reply = slowdown, drop, lost_reply
        self.delete_objects, self.refusal = delete_objects, refusal
        self.bytes_per_second = bytes_per_second  # one shared link for all uploads
        self._link_free_at = 0.0
        self.stalled = threading.Event()  # set: requests hang unanswered (a black hole)
        self.stall_bodies_over: int | None = None  # larger bodies hang unanswered
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.seen: list[Seen] = []
        self.resign = Credentials(*strip_conditional) if strip_conditional else None
        self.dead = False
        self.partitioned = False
        self.held: re.Pattern | None = None  # see hold()
        self.holding = threading.Event()  # a held request has arrived
        self._released = threading.Event()
        self._drop_held = False
        self.corrupted: re.Pattern | None = None  # see corrupt()
        self.corrupt_left = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy.serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request seen."""
        with self.lock:
            return [(s.method, s.path) for s in self.seen]

    def fail_everything(self) -> None:
        """From now on every request gets 503: an endpoint that stays down."""
        self.dead = True

    def cut_off(self) -> None:
        """From now on every connection is dropped unanswered: a network partition."""
        self.partitioned = True

    def recover(self) -> None:
        """The endpoint is back: requests pass again."""
        self.dead = False
        self.partitioned = False

    def hold(self, pattern: str) -> None:
        """From now on, requests whose "METHOD /path" matches ``pattern`` wait for release()."""
        self._released.clear()
        self.holding.clear()
        self.held = re.compile(pattern)

    def release(self, drop: bool = False) -> None:
        """Let the held requests (and later ones) through; ``drop``: close their connections
        unanswered instead, as a client that died while they were in flight leaves them."""
        self._drop_held = drop
        if not drop:
            self.held = None
        self._released.set()

    def corrupt(self, pattern: str, times: int = 1) -> None:
        """Damage the body of the next ``times`` GET answers whose path matches ``pattern``."""
        with self.lock:
            self.corrupted, self.corrupt_left = re.compile(pattern), times

    def _damaged(self, h: BaseHTTPRequestHandler, data: bytes) -> bool:
        with self.lock:
            if (h.command != "GET" or not data or self.corrupted is None
                    or not self.corrupt_left or not self.corrupted.search(urlsplit(h.path).path)):
                return False
            self.corrupt_left -= 1
            self.injected["corrupt"] += 1
            return True

    def _throttle(self, size: int) -> None:
        """Hold the request until a link of ``bytes_per_second`` would have carried it."""
        if not self.bytes_per_second or not size:
            return
        with self.lock:
            start = max(time.monotonic(), self._link_free_at)
            self._link_free_at = start + size / self.bytes_per_second
            done = self._link_free_at
        time.sleep(max(0.0, done - time.monotonic()))

    def _roll(self) -> str:
        with self.lock:
            r = self.rng.random()
        if self.dead or r < self.slowdown:
            return "slowdown"
        if r < self.slowdown + self.drop:
            return "drop"
        if r < self.slowdown + self.drop + self.lost_reply:
            return "lost_reply"
        return "pass"

    def _log(self, h: BaseHTTPRequestHandler, at: float, status: int) -> None:
        with self.lock:
            self.seen.append(Seen(at, h.command, h.path,
                                  {k.lower(): v for k, v in h.headers.items()}, status))

    def _signed_without_conditions(self, h: BaseHTTPRequestHandler, headers: dict[str, str],
                                   body: bytes) -> dict[str, str]:
        """The request as a client that never sent If-Match/If-None-Match would sign it."""
        drop = CONDITIONAL | {"authorization", "x-amz-date", "x-amz-content-sha256",
                              "x-amz-security-token"}
        request = AWSRequest(h.command, f"http://{h.headers['Host']}{h.path}", data=body,
                             headers={k: v for k, v in headers.items() if k.lower() not in drop})
        S3SigV4Auth(self.resign, "s3", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        at = time.time()
        if self.partitioned:
            self._log(h, at, 0)
            h.close_connection = True
            h.connection.shutdown(2)
            return
        length = int(h.headers.get("Content-Length") or 0)
        fate = self._roll()
        with self.lock:
            self.injected[fate] += 1
        if fate == "drop" and length > 1:
            h.rfile.read(length // 2)  # the upload dies halfway
            self._log(h, at, 0)
            h.close_connection = True
            h.connection.shutdown(2)
            return
        body = h.rfile.read(length) if length else b""
        over = self.stall_bodies_over
        if self.stalled.is_set() or (over is not None and len(body) > over):
            self._log(h, at, 0)
            time.sleep(600)  # never answers; the client's own time-outs must cope
            return
        held = self.held
        if held is not None and held.search(f"{h.command} {urlsplit(h.path).path}"):
            self.holding.set()
            self._released.wait(600)
            if self._drop_held:
                self._log(h, at, 0)
                h.close_connection = True
                h.connection.shutdown(2)
                return
        self._throttle(len(body))
        if fate == "slowdown":
            self._log(h, at, 503)
            _reply(h, 503, SLOWDOWN)
            return
        if self._answer_delete_objects(h, body, at):
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.resign is not None and CONDITIONAL & {k.lower() for k in headers}:
            headers = self._signed_without_conditions(h, headers, body)
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self._log(h, at, 0 if fate in ("drop", "lost_reply") else resp.status)
        if fate == "lost_reply":  # done upstream, but the client never hears so
            h.close_connection = True
            h.connection.shutdown(2)
            return
        damaged = self._damaged(h, data)
        if damaged:
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + \
                data[len(data) // 2 + 1:]
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length" and not (
                    damaged and k.lower().startswith("x-amz-checksum")):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) if h.command != "HEAD" else
                                            resp.getheader("Content-Length", "0")))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fate == "drop":  # the download dies halfway (or at once, for empty bodies)
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(data)

    def _answer_delete_objects(self, h: BaseHTTPRequestHandler, body: bytes, at: float) -> bool:
        """Answer a DeleteObjects request in place of the server, as ``delete_objects`` says."""
        query = parse_qs(urlsplit(h.path).query, keep_blank_values=True)
        if h.command != "POST" or "delete" not in query or self.delete_objects == "pass":
            return False
        if self.delete_objects == "require-md5":
            if h.headers.get("Content-MD5"):
                return False
            self._log(h, at, 400)
            _reply(h, 400, _error(self.refusal, "Missing required header for this request: "
                                  "Content-Md5."))
            return True
        errors = b"".join(b"<Error><Key>%s</Key><Code>AccessDenied</Code><Message>Access "
                          b"Denied</Message></Error>" % key
                          for key in re.findall(rb"<Key>(.*?)</Key>", body))
        self._log(h, at, 200)
        _reply(h, 200, b'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns='
               b'"http://s3.amazonaws.com/doc/2006-03-01/">%s</DeleteResult>' % errors)
        return True


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>proxy</RequestId></Error>").encode()


def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)
