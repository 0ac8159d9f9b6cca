"""The contenders: the nginx upstream, nginx as a proxy, Twisted's stock proxy, bungate,
and the Bun original bungate is modelled on.

Each contender is a server on 127.0.0.1 that we start in its own session, wait for with a
real request, load, measure through /proc, and kill with its whole process tree.
"""

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from . import fixtures, probe, procs

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(BENCH_DIR)
#: The PyPy environment ``bench/run --setup-pypy`` makes (git-ignored).
PYPY_VENV = os.path.join(BENCH_DIR, ".pypy-venv")
#: Where the Bun original's sources and setup.sh are, unless $BENCH_BUN_ORIGINAL_DIR says.
BUN_ORIGINAL_DEFAULT = os.path.join(
    os.path.dirname(REPO_DIR), "shared", "anchors", "bungate-original"
)
#: Seconds setup.sh may take (a first run installs Bun and dependencies from npm: ~5 s).
BUN_SETUP_TIMEOUT = 120.0

#: The upstream's body for ``GET /``: 13 bytes.
BODY = "Hello, World!"
#: Paths served by the upstream (and, through every proxy, by the contenders).
PATH_SMALL = "/"
PATH_1MIB = "/files/1mib.bin"
PATH_100MIB = "/files/100mib.bin"

_NGINX_COMMON = """\
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{body}
}}
"""

_NGINX_UPSTREAM = """\
    sendfile on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ default_type text/plain; return 200 "{text}"; }}
        location /files/ {{ alias {files}/; }}
    }}
"""

_NGINX_PROXY = """\
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

#: nginx proxying WebSockets (the websocket scenario): the handshake's Upgrade passed on.
_NGINX_WEBSOCKET = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }}
    }}
"""

#: nginx ending TLS with HTTP/2 (the h2 scenario), the same keep-alive pool upstream.
_NGINX_H2 = """\
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

_BUNGATE_CONFIG = """\
server: {{host: 127.0.0.1, port: {port}{server}}}
cluster: {{enabled: true, workers: {workers}{python}}}
logger: {{level: warn, request_logging: false}}
health: {{details: true}}
{top}routes:
  - {{pattern: /*, target: "http://127.0.0.1:{upstream_port}"{route}}}
"""


class Skip(Exception):
    """A contender cannot run here (e.g. PyPy is not installed); the reason is the message."""


class Missing(Skip):
    """A prerequisite tool is not installed (redis-server, h2load): skipped, never a failure."""


class Contender:
    """
    A server under test.

    :ivar name: the short name used in tables, ``--only`` and JSON.
    :ivar port: the port it serves on 127.0.0.1.
    :ivar workers: how many worker processes it should have (0: single process).
    :ivar worker_title: the process title prefix of its workers, if any.
    """

    name = "?"
    workers = 0
    worker_title: Optional[str] = None
    #: Request headers every probe and every load request carries (credentials).
    load_headers: Dict[str, str] = {}
    #: HTTPS (a self-signed certificate: probes do not check it).
    tls = False

    def __init__(self, workdir: str) -> None:
        """
        :param workdir: a private temporary directory for configs and logs.
        """
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = procs.free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(workdir, "output.log")

    def command(self) -> List[str]:
        """:return: argv that starts the server in the foreground."""
        raise NotImplementedError

    def check(self) -> None:
        """
        :raises Skip: when the contender cannot run on this machine.
        """

    def start(self) -> None:
        """Start the server (does not wait for it)."""
        self.check()
        self.proc = procs.spawn(self.command(), self.log_path, cwd=self.cwd(), env=self.env())

    def cwd(self) -> str:
        """:return: the server's working directory (the repository, by default)."""
        return REPO_DIR

    def env(self) -> Optional[Dict[str, str]]:
        """:return: the environment for the server; ``None`` inherits ours."""
        return None

    def alive(self) -> bool:
        """:return: whether the process we started is still running."""
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> float:
        """
        Wait until the server answers ``GET /`` with 200 and all its workers exist.

        :param timeout: seconds.
        :return: seconds it took.
        :raises probe.NotReady: with the reason and the tail of the server's output.
        """
        try:
            took = probe.wait_ok(
                self.port,
                timeout,
                PATH_SMALL,
                alive=self.alive,
                headers=self.load_headers,
                tls=self.tls,
            )
        except probe.NotReady as e:
            raise probe.NotReady(f"{e}{self.log_tail()}") from None
        if self.workers:
            procs.wait_for(lambda: len(self.worker_pids()) >= self.workers, timeout=timeout)
        return took

    def log_tail(self, lines: int = 5) -> str:
        """:return: the last lines of the server's output, for error messages."""
        try:
            with open(self.log_path, errors="replace") as f:
                tail = [_readable(line) for line in f.read().strip().splitlines()[-lines:]]
        except OSError:
            return ""
        return ("\n    | " + "\n    | ".join(tail)) if tail else ""

    def stop(self) -> None:
        """Stop the server and every process it started."""
        procs.stop(self.proc)
        self.proc = None

    @property
    def root_pid(self) -> Optional[int]:
        """The process we started (the master, for multi-process servers)."""
        return self.proc.pid if self.alive() else None

    def pids(self) -> List[int]:
        """:return: every process of the server, the root first."""
        return procs.process_tree(self.root_pid) if self.root_pid else []

    def worker_pids(self) -> List[int]:
        """:return: the worker processes (the root itself for single-process servers)."""
        if not self.root_pid:
            return []
        if not self.workers:
            return [self.root_pid]
        kids = procs.children(self.root_pid)
        titled = [p for p in kids if self.worker_title and self.worker_title in procs.cmdline(p)]
        return titled or kids

    def url(self, path: str = PATH_SMALL) -> str:
        """:return: the URL of ``path`` on this server."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def helper_pids(self) -> List[int]:
        """:return: processes the server needs that are not its own (a Redis), whose CPU
        time is counted apart."""
        return []

    def counters(self) -> Dict[str, int]:
        """:return: counters read before and after each counted run (e.g. Redis's
        commands), ``{}`` when there are none."""
        return {}

    def served(self) -> Optional[Dict[str, int]]:
        """
        Requests each worker has served so far, if the server tells.

        :return: ``{worker: requests}``, or ``None`` when the server has no such figure.
        """
        return None

    #: The signal that makes the server replace its workers without downtime, if any.
    roll_signal: Optional[int] = None
    #: How the roll is named in tables.
    roll_label = ""


class NginxUpstream(Contender):
    """The upstream: nginx answering 13 bytes, and serving 1 MiB and 100 MiB files."""

    name = "nginx-direct"
    workers = 1
    worker_title = "nginx: worker"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.files = os.path.join(workdir, "files")
        os.makedirs(self.files, exist_ok=True)
        with open(os.path.join(self.files, "1mib.bin"), "wb") as f:
            f.write(os.urandom(1024 * 1024))
        with open(os.path.join(self.files, "100mib.bin"), "wb") as f:
            f.truncate(100 * 1024 * 1024)  # sparse: instant, and nginx sends zeros
        # nginx workers run as "nobody" when we are root: let them read the files.
        for path in (workdir, self.files):
            os.chmod(path, 0o755)
        self.config_path = os.path.join(workdir, "nginx.conf")

    def config(self) -> str:
        """:return: the nginx.conf text."""
        body = _NGINX_UPSTREAM.format(port=self.port, text=BODY, files=self.files)
        return _NGINX_COMMON.format(workers=self.workers, prefix=self.workdir, body=body)

    def check(self) -> None:
        """:raises Skip: when nginx is not on PATH."""
        if not shutil.which("nginx"):
            raise Skip("nginx is not on PATH (apt-get install nginx-light)")

    def command(self) -> List[str]:
        """:return: nginx in the foreground with our generated config."""
        with open(self.config_path, "w") as f:
            f.write(self.config())
        return ["nginx", "-c", self.config_path, "-p", self.workdir, "-g", "daemon off;"]

    roll_signal = signal.SIGHUP
    roll_label = "SIGHUP (nginx -s reload)"


class NginxProxy(NginxUpstream):
    """nginx as a reverse proxy with an upstream keep-alive pool."""

    def __init__(
        self,
        workdir: str,
        upstream_port: int,
        workers: int,
        websocket: bool = False,
        tls: Optional[Tuple[str, str]] = None,
    ) -> None:
        """
        :param workdir: a private temporary directory.
        :param upstream_port: the upstream's port.
        :param workers: ``worker_processes``.
        :param websocket: proxy WebSocket handshakes (``Upgrade`` passed on), no pool.
        :param tls: ``(cert, key)``: listen with ``ssl http2`` instead of plain HTTP.
        """
        Contender.__init__(self, workdir)
        os.chmod(workdir, 0o755)
        self.config_path = os.path.join(workdir, "nginx.conf")
        self.upstream_port = upstream_port
        self.workers = workers
        self.websocket = websocket
        self.cert = tls
        self.tls = tls is not None
        self.name = f"nginx-proxy-{workers}w"

    def config(self) -> str:
        """:return: the nginx.conf text."""
        if self.cert:
            body = _NGINX_H2.format(
                port=self.port,
                upstream_port=self.upstream_port,
                cert=self.cert[0],
                key=self.cert[1],
            )
        else:
            template = _NGINX_WEBSOCKET if self.websocket else _NGINX_PROXY
            body = template.format(port=self.port, upstream_port=self.upstream_port)
        return _NGINX_COMMON.format(workers=self.workers, prefix=self.workdir, body=body)


class StockProxy(Contender):
    """Twisted's ``ReverseProxyResource`` in one process (``bench/stock_proxy.py``)."""

    name = "twisted-stock"

    def __init__(self, workdir: str, upstream_port: int, python: str) -> None:
        """
        :param workdir: a private temporary directory.
        :param upstream_port: the upstream nginx's port.
        :param python: the interpreter that has Twisted.
        """
        super().__init__(workdir)
        self.upstream_port = upstream_port
        self.python = python

    def command(self) -> List[str]:
        """:return: the stock proxy script's command line."""
        script = os.path.join(BENCH_DIR, "stock_proxy.py")
        return [self.python, script, str(self.port), str(self.upstream_port)]


def import_check(python: str, modules: str) -> Optional[str]:
    """
    Whether an interpreter can import some modules (from the gateway's working directory).

    :param python: the interpreter.
    :param modules: a comma-separated module list for an ``import`` statement.
    :return: ``None`` when it can, else the reason (the error's last line).
    """
    if not shutil.which(python) and not os.path.exists(python):
        return f"{python} is not on PATH"
    try:
        result = subprocess.run(
            [python, "-c", f"import {modules}"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python}: {e}"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        return f"{python} -c 'import {modules}': {lines[-1]}"
    return None


class Bungate(Contender):
    """bungate: a master and N workers, started as ``python -m twisted bungate``."""

    worker_title = "bungate worker"
    roll_signal = signal.SIGUSR2
    roll_label = "SIGUSR2"

    def __init__(
        self,
        workdir: str,
        upstream_port: int,
        python: str,
        workers: int,
        pypy: bool = False,
        tls: Optional[Tuple[str, str]] = None,
    ) -> None:
        """
        :param workdir: a private temporary directory.
        :param upstream_port: the upstream's port.
        :param python: the master's interpreter.
        :param workers: ``cluster.workers``.
        :param pypy: workers on PyPy (``cluster.python``: the first of
            :func:`pypy_candidates` that can import bungate and Twisted).
        :param tls: ``(cert, key)``: ``server.tls`` on (ALPN offers h2 first).
        """
        super().__init__(workdir)
        self.upstream_port = upstream_port
        self.python = python
        self.workers = workers
        self.pypy = pypy
        self.cert = tls
        self.tls = tls is not None
        self.worker_python: Optional[str] = None
        self.name = f"bungate-{workers}w" + ("-pypy" if pypy else "")
        self.config_path = os.path.join(workdir, "gateway.yaml")

    #: Added to the route, after its target (``, auth: {...}``): see :class:`BungatePolicy`.
    route_yaml = ""

    def top_yaml(self) -> str:
        """:return: top-level lines before ``routes:`` (e.g. ``redis:``), if any."""
        return ""

    def config(self) -> str:
        """:return: the gateway's YAML config."""
        python = f", python: {json.dumps(self.worker_python)}" if self.worker_python else ""
        # $BENCH_BUNGATE_SERVER adds keys to the server section, e.g. "eager_writes: off",
        # to measure a setting side by side (run the bench once per value).
        extra = os.environ.get("BENCH_BUNGATE_SERVER", "").strip()
        server = f", {extra}" if extra else ""
        if self.cert:
            cert, key = (json.dumps(p) for p in self.cert)
            server += f", tls: {{enabled: true, cert: {cert}, key: {key}}}"
        return _BUNGATE_CONFIG.format(
            server=server,
            port=self.port,
            workers=self.workers,
            python=python,
            top=self.top_yaml(),
            upstream_port=self.upstream_port,
            route=self.route_yaml,
        )

    def check(self) -> None:
        """:raises Skip: when no PyPy can import bungate and Twisted (PyPy contender only)."""
        if self.pypy:
            python, reason = find_pypy()
            if python is None:
                raise Skip(reason)
            self.worker_python = python

    def command(self) -> List[str]:
        """
        :return: ``<python> -m twisted --log-format json --log-level info bungate --config
            FILE``: the workers log at ``warn`` (the config's ``logger.level``), the
            master's own lifecycle lines (spawn, ready, exit, rolls) come as JSON with
            ``log_time`` for :meth:`events`.
        """
        with open(self.config_path, "w") as f:
            f.write(self.config())
        return [
            self.python, "-m", "twisted", "--log-format", "json", "--log-level", "info",
            "bungate", "--config", self.config_path,
        ]  # fmt: skip

    def log_mark(self) -> int:
        """:return: the current end of the master's output, for :meth:`events`."""
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def events(self, since: int = 0) -> List[Dict[str, object]]:
        """
        The master's lifecycle events from its JSON log.

        :param since: a :meth:`log_mark` to read from.
        :return: ``{"event": "worker-ready", "log_time": <time.time()>, "worker_id": .., "pid":
            ..}`` and the like (``worker-spawn``, ``worker-exit``, ``roll-start``,
            ``roll-done``, ``roll-aborted``, ...), in order.
        """
        found = []
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except OSError:
            return found
        for raw in data.splitlines():
            try:
                event = json.loads(raw.lstrip(b"\x1e"))  # RFC 7464 record separators
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event and "log_time" in event:
                found.append(event)
        return found

    def env(self) -> Dict[str, str]:
        """:return: our environment, with unbuffered output for readable logs."""
        return dict(os.environ, PYTHONUNBUFFERED="1")

    def served(self) -> Optional[Dict[str, int]]:
        """
        The ``workers`` list of ``/health``: every worker's request count (read from
        the table the workers share, so any worker answers for all of them).

        :return: ``{"<id>/<pid>": requests}``, or ``None`` if ``/health`` did not tell.
        """
        try:
            status, body, _ = probe.get(self.port, "/health", timeout=5.0, tls=self.tls)
            workers = json.loads(body).get("workers") if status == 200 else None
            if not workers:
                return None
            return {f"{w['id']}/{w['pid']}": int(w["requests"]) for w in workers}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


#: The policy scenario's contenders: bungate-2w with one policy on its route.
POLICIES = ("jwt", "apikey", "ratelimit-local", "ratelimit-redis")


class BungatePolicy(Bungate):
    """
    bungate-2w (CPython) with one policy on its route ``/*``, and the load's credentials:

    - ``jwt``: ``auth: {jwt: {secret, algorithms: [HS256]}}``; every request carries
      ``Authorization: Bearer <an HS256 token>`` (``sub``, ``exp`` in a day);
    - ``apikey``: ``auth: {api_keys: [key]}``; every request carries ``X-API-Key``;
    - ``ratelimit-local``, ``ratelimit-redis``: ``rate_limit: {max: 100000000, window: 1,
      backend: ...}`` (never trips); for ``redis`` a ``redis-server`` of its own is
      started on a free port before the gateway (top-level ``redis.url``) and stopped
      after it. Its CPU time is counted apart (:meth:`helper_pids`) and its commands are
      counted around each run (:meth:`counters`): one ``EVALSHA`` per request shows
      that Redis, not the local fallback, decided.
    """

    def __init__(self, workdir: str, upstream_port: int, python: str, policy: str) -> None:
        """
        :param workdir: a private temporary directory.
        :param upstream_port: the upstream's port.
        :param python: the master's and the workers' interpreter (CPython).
        :param policy: one of :data:`POLICIES`.
        """
        super().__init__(workdir, upstream_port, python, 2)
        self.policy = policy
        self.name = f"bungate-2w-{policy}"
        self.redis: Optional[fixtures.RedisServer] = None
        self.secret = ""
        if policy == "jwt":
            self.secret = secrets.token_urlsafe(36)  # 48 characters
            token = fixtures.hs256_jwt(
                self.secret, {"sub": "bench", "exp": int(time.time()) + 86400}
            )
            self.route_yaml = (
                f", auth: {{jwt: {{secret: {json.dumps(self.secret)}, algorithms: [HS256]}}}}"
            )
            self.load_headers = {"Authorization": f"Bearer {token}"}
        elif policy == "apikey":
            self.secret = secrets.token_urlsafe(24)  # 32 characters
            self.route_yaml = f", auth: {{api_keys: [{json.dumps(self.secret)}]}}"
            self.load_headers = {"X-API-Key": self.secret}
        elif policy in ("ratelimit-local", "ratelimit-redis"):
            backend = policy.split("-")[1]
            self.route_yaml = f", rate_limit: {{max: 100000000, window: 1, backend: {backend}}}"
            self.load_headers = {}
        else:
            raise ValueError(policy)

    def top_yaml(self) -> str:
        """:return: ``redis: {url: ...}`` for the Redis backend."""
        if self.redis is None:
            return ""
        return f'redis: {{url: "redis://127.0.0.1:{self.redis.port}/0"}}\n'

    def check(self) -> None:
        """:raises Skip: for the Redis backend without ``redis-server``."""
        super().check()
        if self.policy == "ratelimit-redis" and not shutil.which("redis-server"):
            raise Missing("redis-server is not on PATH (apt-get install redis-server)")

    def start(self) -> None:
        """Start the Redis first (Redis backend), then the gateway."""
        self.check()
        if self.policy == "ratelimit-redis":
            self.redis = fixtures.RedisServer(os.path.join(self.workdir, "redis"))
            self.redis.start()  # FixtureError (an OSError): the contender did not start
        try:
            super().start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the gateway, then its Redis."""
        super().stop()
        if self.redis is not None:
            self.redis.stop()

    def helper_pids(self) -> List[int]:
        """:return: the Redis server's process, for the Redis backend."""
        return self.redis.pids() if self.redis is not None else []

    def counters(self) -> Dict[str, int]:
        """:return: Redis's command counts, for the Redis backend."""
        return self.redis.counters() if self.redis is not None else {}


class WsEcho(Contender):
    """The websocket scenario's upstream: ``bench/ws.py serve PORT``, one process."""

    name = "ws-direct"

    def __init__(self, workdir: str) -> None:
        """:param workdir: a private temporary directory."""
        super().__init__(workdir)
        self.python = sys.executable

    def command(self) -> List[str]:
        """:return: the echo server's command line (stdlib only: any python3)."""
        return [self.python, os.path.join(BENCH_DIR, "ws.py"), "serve", str(self.port)]


class BunOriginal(Contender):
    """
    The Bun original (Bungate on Bun, from the anchors directory): ``bun gateway.ts``
    with one route ``/*`` to the upstream and logging off, in one process
    (``BUNGATE_WORKERS=0``) or in its own cluster mode (a master spawning N workers that
    each listen on the port with ``SO_REUSEPORT``).
    """

    def __init__(self, workdir: str, upstream_port: int, workers: int) -> None:
        """
        :param workdir: a private temporary directory.
        :param upstream_port: the upstream nginx's port.
        :param workers: ``BUNGATE_WORKERS``: 0 for one process, else its cluster size.
        """
        super().__init__(workdir)
        self.upstream_port = upstream_port
        self.workers = workers
        self.name = "bun-original" + (f"-{workers}" if workers else "")
        self.dir: Optional[str] = None

    def check(self) -> None:
        """:raises Skip: when the anchors directory, node/npm or the setup is missing."""
        prepared, reason = find_bun_original()
        if prepared is None:
            raise Skip(reason)
        self.dir = prepared

    def command(self) -> List[str]:
        """:return: ``<dir>/node_modules/.bin/bun <dir>/gateway.ts``."""
        assert self.dir is not None
        return [_bun(self.dir), os.path.join(self.dir, "gateway.ts")]

    def cwd(self) -> str:
        """:return: the prepared directory."""
        return self.dir or REPO_DIR

    def env(self) -> Dict[str, str]:
        """:return: our environment plus the gateway's settings (gateway.ts reads them)."""
        return dict(
            os.environ,
            LOG_LEVEL="error",
            GATEWAY_PORT=str(self.port),
            UPSTREAM_URL=f"http://127.0.0.1:{self.upstream_port}",
            BUNGATE_WORKERS=str(self.workers),
        )

    def wait_ready(self, timeout: float) -> float:
        """
        As for every server, then (cluster mode) until each worker listens: they each
        open their own socket (``SO_REUSEPORT``) a moment after they exist, and the
        kernel spreads new connections over the sockets that are there.
        """
        start = time.monotonic()
        super().wait_ready(timeout)
        if self.workers:
            procs.wait_for(
                lambda: len(procs.listeners(self.port, self.worker_pids())) >= self.workers,
                timeout=timeout,
            )
        return time.monotonic() - start

    def pids(self) -> List[int]:
        """:return: the process tree of the root, and anything else in its process group."""
        root = self.root_pid
        if not root:
            return []
        tree = procs.process_tree(root)
        return tree + [p for p in procs.group_members(root) if p not in tree]


def bun_original_dir() -> str:
    """:return: ``$BENCH_BUN_ORIGINAL_DIR``, else ``../shared/anchors/bungate-original``."""
    return os.environ.get("BENCH_BUN_ORIGINAL_DIR") or BUN_ORIGINAL_DEFAULT


def _bun(prepared: str) -> str:
    return os.path.join(prepared, "node_modules", ".bin", "bun")


def bun_original_cache(source: str) -> str:
    """
    Where setup.sh prepares the Bun original: kept between runs (setup.sh does nothing
    more once it is there), and named after the anchors' ``SOURCE``, ``setup.sh`` and
    ``gateway.ts`` so that new sources get a fresh directory.

    :param source: the anchors directory.
    :return: ``<tmp>/bungate-original-<hash>``.
    """
    digest = hashlib.sha256()
    for name in ("SOURCE", "setup.sh", "gateway.ts"):
        try:
            with open(os.path.join(source, name), "rb") as f:
                digest.update(f.read())
        except OSError:
            pass
    return os.path.join(tempfile.gettempdir(), f"bungate-original-{digest.hexdigest()[:12]}")


_BUN: Dict[str, Tuple[Optional[str], str]] = {}


def find_bun_original(log=None) -> Tuple[Optional[str], str]:
    """
    Prepare the Bun original once per run (its setup.sh: Bun from npm, then its sources
    built beside it) and say where.

    :param log: progress output, if any (a first setup takes a few seconds).
    :return: ``(prepared directory, "")``, or ``(None, why not)``: no anchors directory,
        no node/npm, or setup.sh failed (e.g. the npm registry is unreachable).
    """
    if "result" in _BUN:
        return _BUN["result"]
    source = bun_original_dir()
    setup = os.path.join(source, "setup.sh")
    cache = bun_original_cache(source)
    result: Tuple[Optional[str], str]
    if not os.path.isfile(setup):
        result = (None, f"no {setup} (set BENCH_BUN_ORIGINAL_DIR to the Bun original's anchors)")
    elif not os.access(_bun(cache), os.X_OK) and not (shutil.which("node") and shutil.which("npm")):
        result = (None, "node/npm are not on PATH (setup.sh installs Bun with npm)")
    else:
        if log is not None and not os.access(_bun(cache), os.X_OK):
            log(f"preparing the Bun original (first time here): {setup} {cache}")
        result = _run_setup(setup, cache)
    _BUN["result"] = result
    return result


def _run_setup(setup: str, cache: str) -> Tuple[Optional[str], str]:
    try:
        out = subprocess.run(
            ["bash", setup, cache],
            capture_output=True,
            text=True,
            timeout=BUN_SETUP_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, f"{setup} {cache} took over {BUN_SETUP_TIMEOUT:.0f} s"
    except OSError as e:
        return None, f"{setup}: {e}"
    lines = out.stdout.strip().splitlines()
    prepared = lines[-1].strip() if lines else ""
    if out.returncode != 0 or not os.access(_bun(prepared or cache), os.X_OK):
        tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:]) or "no output"
        return None, f"{setup} {cache} failed (exit {out.returncode}): {tail}"
    return prepared, ""


def bun_version(prepared: str) -> str:
    """:return: ``bun --version`` of a prepared directory, or why not."""
    try:
        out = subprocess.run(
            [_bun(prepared), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return out.stdout.strip() or "unavailable"


def default_python() -> str:
    """
    The interpreter that runs bungate and the stock proxy.

    :return: ``$BUNGATE_PYTHON``, else the interpreter running this script.
    """
    return os.environ.get("BUNGATE_PYTHON") or sys.executable


def _readable(line: str) -> str:
    """A JSON log line (twist ``--log-format json``) as its message; other lines as they are."""
    try:
        event = json.loads(line.lstrip("\x1e"))
        return str(event["log_format"]).format(**event)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return line


def pypy_candidates() -> List[str]:
    """
    Interpreters to try for the PyPy workers, in order.

    :return: ``[$BUNGATE_PYPY]`` when set; else ``bench/.pypy-venv`` (``--setup-pypy``),
        tox's ``.tox/pypy3`` (there after ``tox``, as in CI) and plain ``pypy3``.
    """
    chosen = os.environ.get("BUNGATE_PYPY")
    if chosen:
        return [chosen]
    return [
        os.path.join(PYPY_VENV, "bin", "python"),
        os.path.join(REPO_DIR, ".tox", "pypy3", "bin", "python"),
        "pypy3",
    ]


_PYPY: Dict[str, Tuple[Optional[str], str]] = {}


def find_pypy() -> Tuple[Optional[str], str]:
    """
    The first PyPy that can import bungate's dependencies and bungate (from the repository).

    :return: ``(interpreter, "")``, or ``(None, why each candidate was refused)``.
    """
    if "result" in _PYPY:
        return _PYPY["result"]
    refused = []
    for python in pypy_candidates():
        reason = import_check(python, "bungate, twisted.web")
        if reason is None and not is_pypy(python):
            reason = f"{python} is not PyPy"
        if reason is None:
            _PYPY["result"] = (python, "")
            return _PYPY["result"]
        refused.append(reason)
    hint = "make one with `bench/run --setup-pypy` or set BUNGATE_PYPY"
    _PYPY["result"] = (None, "; ".join(refused) + f" ({hint})")
    return _PYPY["result"]


def is_pypy(python: str) -> bool:
    """:return: whether ``python`` is a PyPy interpreter."""
    try:
        out = subprocess.run(
            [python, "-c", "import platform; print(platform.python_implementation())"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "PyPy"


def setup_pypy(log) -> int:
    """
    Make ``bench/.pypy-venv``: a PyPy venv with this repository installed (not editable).

    The workers import bungate from the repository itself (they run with it as their
    working directory), so the install only needs to bring the dependencies; re-run it
    when they change.

    :param log: progress output.
    :return: an exit status.
    """
    pypy = shutil.which("pypy3")
    if not pypy:
        log("bench/run --setup-pypy: pypy3 is not on PATH (apt-get install pypy3)")
        return 2
    steps = [
        [pypy, "-m", "venv", PYPY_VENV],
        [
            os.path.join(PYPY_VENV, "bin", "python"), "-m", "pip", "install", "-q",
            "--only-binary=cryptography", REPO_DIR,
        ],
    ]  # fmt: skip
    for argv in steps:
        log("+ " + " ".join(argv))
        if subprocess.run(argv, cwd=REPO_DIR).returncode != 0:
            log("bench/run --setup-pypy: failed")
            return 1
    _PYPY.clear()
    python, reason = find_pypy()
    log(f"PyPy workers will use {python}" if python else f"still no usable PyPy: {reason}")
    return 0 if python else 1
