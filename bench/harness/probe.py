"""Small HTTP probes: readiness polling and "which worker answered this"."""

import http.client
import ssl
import time
from typing import Callable, Dict, Optional, Tuple


class NotReady(RuntimeError):
    """A server did not answer 200 within the time allowed."""


def _connection(port: int, timeout: float, tls: bool) -> http.client.HTTPConnection:
    if not tls:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    # The harness's own self-signed certificate: nothing to verify it against.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)


def fetch(
    port: int,
    path: str = "/",
    timeout: float = 2.0,
    headers: Optional[Dict[str, str]] = None,
    tls: bool = False,
) -> Tuple[int, Dict[str, str], bytes]:
    """
    One GET on a fresh connection to 127.0.0.1, with the answer's headers.

    :param port: the server port.
    :param path: the request path.
    :param timeout: socket timeout in seconds.
    :param headers: request headers (e.g. credentials).
    :param tls: HTTPS (the certificate is not checked).
    :return: ``(status, {lower-case header name: value}, body)``.
    :raises OSError: or an ``http.client`` error when the request fails.
    """
    conn = _connection(port, timeout, tls)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def get(
    port: int,
    path: str = "/",
    timeout: float = 2.0,
    while_open: Optional[Callable[[int], object]] = None,
    headers: Optional[Dict[str, str]] = None,
    tls: bool = False,
) -> Tuple[int, bytes, object]:
    """
    One GET on a fresh connection to 127.0.0.1.

    :param port: the server port.
    :param path: the request path.
    :param timeout: socket timeout in seconds.
    :param while_open: called with our local (client) port after the response was read,
        while the connection is still open, e.g. to find which process accepted it.
    :param headers: request headers (e.g. credentials).
    :param tls: HTTPS (the certificate is not checked).
    :return: ``(status, body, while_open's result or None)``.
    :raises OSError: or an ``http.client`` error when the request fails.
    """
    conn = _connection(port, timeout, tls)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        extra = None
        if while_open is not None and conn.sock is not None:
            extra = while_open(conn.sock.getsockname()[1])
        return response.status, body, extra
    finally:
        conn.close()


def wait_ok(
    port: int,
    timeout: float,
    path: str = "/",
    alive: Optional[Callable[[], bool]] = None,
    headers: Optional[Dict[str, str]] = None,
    tls: bool = False,
) -> float:
    """
    Poll until a GET answers 200: connect and request, never sleep-and-hope.

    :param port: the server port.
    :param timeout: seconds before giving up.
    :param path: the request path.
    :param alive: returns False when the server process died, to fail fast.
    :param headers: request headers (e.g. credentials).
    :param tls: HTTPS (the certificate is not checked).
    :return: seconds it took.
    :raises NotReady: with the last error seen.
    """
    start = time.monotonic()
    last = "no attempt"
    while time.monotonic() - start < timeout:
        if alive is not None and not alive():
            raise NotReady(f"the process exited before answering ({last})")
        try:
            status, _, _ = get(port, path, timeout=1.0, headers=headers, tls=tls)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.05)
    scheme = "https" if tls else "http"
    raise NotReady(f"no 200 from {scheme}://127.0.0.1:{port}{path} within {timeout:.0f} s ({last})")
