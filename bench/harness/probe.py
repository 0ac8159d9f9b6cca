"""Small HTTP probes: readiness polling and "which worker answered this"."""

import http.client
import time
from typing import Callable, Optional, Tuple


class NotReady(RuntimeError):
    """A server did not answer 200 within the time allowed."""


def get(
    port: int,
    path: str = "/",
    timeout: float = 2.0,
    while_open: Optional[Callable[[int], object]] = None,
) -> Tuple[int, bytes, object]:
    """
    One GET on a fresh connection to 127.0.0.1.

    :param port: the server port.
    :param path: the request path.
    :param timeout: socket timeout in seconds.
    :param while_open: called with our local (client) port after the response was read,
        while the connection is still open, e.g. to find which process accepted it.
    :return: ``(status, body, while_open's result or None)``.
    :raises OSError: or an ``http.client`` error when the request fails.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
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
) -> float:
    """
    Poll until a GET answers 200: connect and request, never sleep-and-hope.

    :param port: the server port.
    :param timeout: seconds before giving up.
    :param path: the request path.
    :param alive: returns False when the server process died, to fail fast.
    :return: seconds it took.
    :raises NotReady: with the last error seen.
    """
    start = time.monotonic()
    last = "no attempt"
    while time.monotonic() - start < timeout:
        if alive is not None and not alive():
            raise NotReady(f"the process exited before answering ({last})")
        try:
            status, _, _ = get(port, path, timeout=1.0)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.05)
    raise NotReady(f"no 200 from 127.0.0.1:{port}{path} within {timeout:.0f} s ({last})")
