"""What some scenarios need besides the servers under test: a Redis, a certificate, a JWT.

- :class:`RedisServer`: a real ``redis-server`` on a free port, no persistence, and a
  minimal RESP client for ``PING`` and ``INFO`` (stdlib only).
- :func:`make_cert`: a self-signed certificate for 127.0.0.1, made with the ``openssl``
  command line or, without it, with ``cryptography`` in bungate's interpreter.
- :func:`hs256_jwt`: an HS256 JSON Web Token, signed with the stdlib's ``hmac``.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from . import procs


class FixtureError(OSError):
    """A fixture could not be made or started; the reason is the message."""


# --- Redis --------------------------------------------------------------------------------


class RedisServer:
    """``redis-server --port N --save "" --appendonly no --bind 127.0.0.1``, in its own
    session, its output in ``<workdir>/redis.log``."""

    def __init__(self, workdir: str) -> None:
        """:param workdir: a private directory (redis-server's ``--dir``)."""
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = procs.free_port()
        self.log_path = os.path.join(workdir, "redis.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> float:
        """
        Start it and wait until it answers ``PING``.

        :return: seconds it took.
        :raises FixtureError: when redis-server is missing or does not answer in time.
        """
        if not shutil.which("redis-server"):
            raise FixtureError("redis-server is not on PATH (apt-get install redis-server)")
        argv = [
            "redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--bind", "127.0.0.1", "--dir", self.workdir,
        ]  # fmt: skip
        self.proc = procs.spawn(argv, self.log_path, cwd=self.workdir)
        start = time.monotonic()
        last = "no attempt"
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                break
            try:
                if self.command("PING") == "PONG":
                    return time.monotonic() - start
                last = "no PONG"
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise FixtureError(f"redis-server on port {self.port} did not answer PING ({last}){tail}")

    def log_tail(self, lines: int = 3) -> str:
        """:return: the last lines of its output, for error messages."""
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.read().strip().splitlines()[-lines:]
        except OSError:
            return ""
        return (": " + " | ".join(tail)) if tail else ""

    def command(self, *args: str, timeout: float = 2.0) -> str:
        """
        One command on a fresh connection.

        :return: a simple string's or a bulk string's text.
        :raises OSError: on a connection problem or an error reply.
        """
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(request.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("redis closed the connection")
                data += chunk
                reply = _resp(data)
                if reply is not None:
                    return reply

    def info(self) -> Dict[str, str]:
        """:return: ``INFO all`` as ``{field: value}``."""
        fields = {}
        for line in self.command("INFO", "all").splitlines():
            name, sep, value = line.partition(":")
            if sep and not name.startswith("#"):
                fields[name] = value
        return fields

    def counters(self) -> Dict[str, int]:
        """
        :return: ``redis_commands`` (``total_commands_processed``) and ``redis_decisions``
            (calls of ``EVALSHA`` and ``EVAL``: one per rate-limit decision), or ``{}``
            when Redis does not answer.
        """
        try:
            info = self.info()
        except OSError:
            return {}
        decisions = 0
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            stats = dict(kv.split("=", 1) for kv in info.get(name, "").split(",") if "=" in kv)
            decisions += int(stats.get("calls", 0))
        return {
            "redis_commands": int(info.get("total_commands_processed", 0)),
            "redis_decisions": decisions,
        }

    def pids(self) -> List[int]:
        """:return: its process, while it runs."""
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        """Stop it (its process group)."""
        procs.stop(self.proc)
        self.proc = None


def _resp(data: bytes) -> Optional[str]:
    """A complete RESP reply's text (simple or bulk string), ``None`` while incomplete."""
    end = data.find(b"\r\n")
    if end < 0:
        return None
    kind, first = data[:1], data[1:end].decode(errors="replace")
    if kind == b"-":
        raise OSError(f"redis: {first}")
    if kind in (b"+", b":"):
        return first
    if kind == b"$":
        n = int(first)
        if n < 0:
            return ""
        body = data[end + 2 : end + 2 + n]
        return body.decode(errors="replace") if len(body) == n else None
    raise OSError(f"redis: unexpected reply {data[:40]!r}")


# --- a certificate ------------------------------------------------------------------------


def make_cert(directory: str, python: str) -> Tuple[str, str, str]:
    """
    A self-signed certificate for ``127.0.0.1`` (and ``localhost``), EC P-256, valid 2 days.

    :param directory: where ``cert.pem`` and ``key.pem`` go.
    :param python: an interpreter with ``cryptography`` (bungate's), used when there is
        no ``openssl`` command.
    :return: ``(cert path, key path, how it was made)``.
    :raises FixtureError: when neither way works.
    """
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    reasons = []
    if shutil.which("openssl"):
        argv = [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
            "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return cert, key, "openssl req -x509 (EC P-256)"
        reasons.append(f"openssl exited {out.returncode}: {out.stderr.strip()[-200:]}")
    else:
        reasons.append("no openssl command")
    out = subprocess.run(
        [python, "-c", _CRYPTOGRAPHY_CERT, cert, key], capture_output=True, text=True, timeout=60
    )
    if out.returncode == 0:
        return cert, key, f"cryptography in {python} (EC P-256)"
    reasons.append(f"{python} with cryptography: {out.stderr.strip().splitlines()[-1:]}")
    raise FixtureError("cannot make a certificate: " + "; ".join(reasons))


_CRYPTOGRAPHY_CERT = """\
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
now = datetime.datetime.now(datetime.timezone.utc)
san = x509.SubjectAlternativeName(
    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(san, critical=False).sign(key, hashes.SHA256()))
open(sys.argv[1], "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[2], "wb").write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
"""


# --- a JWT --------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_jwt(secret: str, payload: Dict[str, object]) -> str:
    """
    :param secret: the HMAC key.
    :param payload: the claims.
    :return: ``base64url(header).base64url(payload).base64url(HMAC-SHA256)``, header
        ``{"alg":"HS256","typ":"JWT"}``.
    """
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{header}.{body}".encode()
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"
