"""The websocket scenario's upstream and load client: WebSocket (RFC 6455), stdlib only.

Usage::

    python bench/ws.py serve PORT
    python bench/ws.py load PORT CONNECTIONS SECONDS [PATH]

``serve``: an echo server on ``127.0.0.1:PORT``, one process, one thread (``selectors``):
a ``GET`` with ``Upgrade: websocket`` gets the handshake (``Sec-WebSocket-Accept`` is
base64(sha1(key + GUID))), then every text, binary or continuation frame comes back as
it came, unmasked; a ping gets its pong, a close its close. Any other request gets
``200 ok`` (keep-alive), so the harness's readiness probes work through every proxy.

``load``: opens CONNECTIONS WebSockets to ``127.0.0.1:PORT`` (checking the 101 and its
accept key), then on each one sends a 64-byte masked text frame and waits for its echo,
again and again for SECONDS; prints one JSON line: round trips, per-second rate and
percentiles of the round trip, and errors. One thread drives every connection
(``selectors``), so the client's own cost per message is as small as pure Python allows.
Each connection masks with one random key of its own, drawn at connect (RFC 6455 wants a
fresh key per frame; the key only protects browsers' intermediaries, and a proxy relays
the masked bytes as they are).
"""

import base64
import hashlib
import json
import os
import selectors
import socket
import struct
import sys
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAYLOAD = b"0123456789abcdef" * 4  # 64 bytes
#: The echo of PAYLOAD from the server: FIN + text, unmasked, length 64.
ECHO = bytes([0x81, len(PAYLOAD)]) + PAYLOAD


def accept_key(key: bytes) -> bytes:
    """:return: ``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def _unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    k = int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ k).to_bytes(n, "little")


def _frame(first: int, payload: bytes) -> bytes:
    """An unmasked frame: ``first`` is FIN/RSV/opcode."""
    n = len(payload)
    if n < 126:
        return bytes([first, n]) + payload
    if n < 65536:
        return bytes([first, 126]) + struct.pack(">H", n) + payload
    return bytes([first, 127]) + struct.pack(">Q", n) + payload


# --- the echo server ---------------------------------------------------------------------


class _Conn:
    __slots__ = ("buf", "closing", "out", "sock", "ws")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.ws = False
        self.out = b""
        self.closing = False

    def http(self) -> bytes:
        """Answer the complete requests in ``buf``; switch to frames after a handshake."""
        replies = []
        while not self.ws:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            skip = int(headers.get(b"content-length", b"0") or 0)
            self.buf = self.buf[skip:]  # a body: not expected, dropped
            key = headers.get(b"sec-websocket-key")
            if b"websocket" in headers.get(b"upgrade", b"").lower() and key:
                replies.append(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
                )
                self.ws = True
            else:
                close = headers.get(b"connection", b"").lower() == b"close"
                replies.append(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                    + (b"Connection: close\r\n" if close else b"")
                    + b"\r\nok\n"
                )
                if close:
                    self.closing = True
                    break
        return b"".join(replies)

    def frames(self) -> bytes:
        """Echo the complete frames in ``buf``, unmasked."""
        replies = []
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack_from(">H", buf, 2)[0]
                at = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack_from(">Q", buf, 2)[0]
                at = 10
            masked = b1 & 0x80
            end = at + (4 if masked else 0) + n
            if len(buf) < end:
                break
            payload = buf[end - n : end]
            if masked:
                payload = _unmask(payload, buf[at : at + 4])
            buf = buf[end:]
            opcode = b0 & 0x0F
            if opcode == 0x8:  # close: answer with the same status, then close
                replies.append(_frame(0x88, payload[:2]))
                self.closing = True
                break
            if opcode == 0x9:
                replies.append(_frame(0x8A, payload))
            elif opcode in (0x0, 0x1, 0x2):
                replies.append(_frame(b0, payload))
        self.buf = buf
        return b"".join(replies)


def serve(port: int) -> None:
    """Serve the echo server on 127.0.0.1:``port`` until killed."""
    sel = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)

    def close(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    def send(c: _Conn, data: bytes) -> None:
        data = c.out + data
        try:
            sent = c.sock.send(data) if data else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        c.out = data[sent:]
        if c.out:  # the peer is not reading: stop reading until it does
            sel.modify(c.sock, selectors.EVENT_WRITE, c)
        elif c.closing:
            close(c)
        else:
            sel.modify(c.sock, selectors.EVENT_READ, c)

    while True:
        for key, events in sel.select():
            c = key.data
            if c is None:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(sock, selectors.EVENT_READ, _Conn(sock))
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    send(c, b"")
                    continue
                data = c.sock.recv(262144)
                if not data:
                    close(c)
                    continue
                c.buf += data
                out = c.http() if not c.ws else b""
                if c.ws and c.buf:
                    out += c.frames()
                if out or c.closing:
                    send(c, out)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                if c.sock.fileno() >= 0:
                    close(c)


# --- the load client ----------------------------------------------------------------------


def _handshake(port: int, path: str, timeout: float = 10.0) -> socket.socket:
    """
    Open one WebSocket.

    :return: the connected socket, after a checked 101.
    :raises OSError: on a failed connection or handshake.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode()
            + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key
            + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("connection closed during the handshake")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101" not in status:
            raise OSError(f"handshake answered {status.decode(errors='replace')!r}")
        if accept_key(key) not in head:
            raise OSError("wrong or missing Sec-WebSocket-Accept")
        if rest:
            raise OSError("data before the first message")
        return sock
    except BaseException:
        sock.close()
        raise


def load(port: int, connections: int, seconds: float, path: str = "/") -> dict:
    """
    Round trips of a 64-byte text frame on ``connections`` WebSockets for ``seconds``.

    :return: figures (see the module's docstring).
    """
    errors = {"handshake": 0, "closed": 0, "bad_echo": 0}
    first_error = None
    socks = []
    for _ in range(connections):
        try:
            socks.append(_handshake(port, path))
        except OSError as e:
            errors["handshake"] += 1
            first_error = first_error or f"handshake: {e}"
    sel = selectors.DefaultSelector()
    frames, sent_at, got = {}, {}, {}
    latencies = []
    record = latencies.append
    clock = time.perf_counter
    for sock in socks:
        sock.setblocking(False)
        mask = os.urandom(4)
        frames[sock] = bytes([0x81, 0x80 | len(PAYLOAD)]) + mask + _unmask(PAYLOAD, mask)
        got[sock] = b""
        sel.register(sock, selectors.EVENT_READ)
    started = clock()
    deadline = started + seconds
    for sock in socks:
        sent_at[sock] = clock()
        sock.send(frames[sock])
    want = len(ECHO)
    open_ = len(socks)
    while open_:
        now = clock()
        if now >= deadline:
            break
        for key, _ in sel.select(min(0.1, deadline - now)):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                data = b""
                first_error = first_error or f"recv: {e}"
            if not data:
                errors["closed"] += 1
                first_error = first_error or "a connection was closed during the run"
                sel.unregister(sock)
                open_ -= 1
                continue
            buf = got[sock] + data
            if len(buf) < want:
                got[sock] = buf
                continue
            t = clock()
            if buf != ECHO:
                errors["bad_echo"] += 1
                first_error = first_error or f"unexpected echo {buf[:80]!r}"
                sel.unregister(sock)
                open_ -= 1
                continue
            got[sock] = b""
            if t < deadline:
                record(t - sent_at[sock])
                sent_at[sock] = t
                try:
                    sock.send(frames[sock])
                except OSError as e:
                    errors["closed"] += 1
                    first_error = first_error or f"send: {e}"
                    sel.unregister(sock)
                    open_ -= 1
    wall = min(clock(), deadline) - started
    for sock in socks:
        sock.close()
    latencies.sort()

    def pct(p: float):
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1e3, 3)

    return {
        "connections": connections,
        "connected": len(socks),
        "messages": len(latencies),
        "seconds": round(wall, 3),
        "rate": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
        "latency_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "max": round(latencies[-1] * 1e3, 3) if latencies else None,
        },
        "errors": errors,
        "error_count": sum(errors.values()),
        "first_error": first_error,
        "payload_bytes": len(PAYLOAD),
    }


def main(argv) -> int:
    """``serve PORT`` or ``load PORT CONNECTIONS SECONDS [PATH]``."""
    if len(argv) == 2 and argv[0] == "serve":
        serve(int(argv[1]))
        return 0
    if len(argv) in (4, 5) and argv[0] == "load":
        path = argv[4] if len(argv) == 5 else "/"
        print(json.dumps(load(int(argv[1]), int(argv[2]), float(argv[3]), path)), flush=True)
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
