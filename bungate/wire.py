"""
The contract between the master and its workers (internal); the only module that knows it.

A worker is started with:

- its descriptors: fd 3 the main listening socket, fd 4 one end of the control channel
  (a socketpair), then the extra listeners (the plain-HTTP redirect, the metrics
  listener) from fd 5 on, then the shared accept table, then the shared rate-limit table
  (:mod:`bungate.limit_table`; each table only when passed, the next one taking the free
  number);
- its environment: ``CLUSTER_WORKER=true`` and ``CLUSTER_WORKER_ID=<slot id>`` (the spec's
  names, for user code), and ``BUNGATE_*`` variables holding the rest of a
  :class:`WorkerLaunch`: the master's pid, the names of the extra descriptors, the
  validated config as JSON, the private certificate copies, the accept-table slot and
  the rate-limit table's descriptor.

The variables of ours:

- ``BUNGATE_MASTER_PID``: the master's pid;
- ``BUNGATE_FDS``: ``name=fd,...`` of the extra listeners;
- ``BUNGATE_CONFIG``: the validated config as JSON (built-in workers);
- ``BUNGATE_TLS_COPIES``: ``{copy: original}`` as JSON;
- ``BUNGATE_ACCEPT_TABLE``: ``<fd>:<slot>`` of the accept table;
- ``BUNGATE_LIMIT_TABLE``: ``<fd>`` of the rate-limit table the master made once for
  its whole life (so every worker, a respawned or rolled one too, decides on the same
  budgets); absent when the master could not make it.

The control channel carries newline-delimited JSON objects, ``{"t": KIND, ...}``: the
worker sends ``ready`` once it listens, ``heartbeat`` every ``heartbeat_interval``,
``draining`` when it starts to drain, and ``config-request`` when it got SIGHUP; the master
sends ``fleet`` summaries (for ``/health``) and ``config`` (the accepted config, the answer
to ``config-request``). Both ends use :class:`ControlChannel`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import attrs
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

__all__ = [
    "CONFIG",
    "CONFIG_REQUEST",
    "CONTROL_FD",
    "DRAINING",
    "FLEET",
    "HEARTBEAT",
    "LISTEN_FD",
    "READY",
    "ControlChannel",
    "WorkerLaunch",
    "in_worker",
    "worker_id",
]

_log = Logger(namespace="bungate.wire")

LISTEN_FD = 3
"""The main listening socket in a worker."""
CONTROL_FD = 4
"""The worker's end of the control channel."""
_FIRST_EXTRA_FD = 5

# The spec's names (user code reads them), then ours.
_WORKER = "CLUSTER_WORKER"
_WORKER_ID = "CLUSTER_WORKER_ID"
_MASTER_PID = "BUNGATE_MASTER_PID"
_FDS = "BUNGATE_FDS"
_CONFIG = "BUNGATE_CONFIG"
_TLS_COPIES = "BUNGATE_TLS_COPIES"
_ACCEPT_TABLE = "BUNGATE_ACCEPT_TABLE"
_LIMIT_TABLE = "BUNGATE_LIMIT_TABLE"
_OURS = (
    _WORKER,
    _WORKER_ID,
    _MASTER_PID,
    _FDS,
    _CONFIG,
    _TLS_COPIES,
    _ACCEPT_TABLE,
    _LIMIT_TABLE,
)

# Control messages.
READY = "ready"
HEARTBEAT = "heartbeat"
DRAINING = "draining"
FLEET = "fleet"
#: a worker asks for the accepted config (it got SIGHUP); the master answers CONFIG.
CONFIG_REQUEST = "config-request"
CONFIG = "config"


def in_worker(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process was started by a bungate master as a worker."""
    env = os.environ if environ is None else environ
    return env.get(_WORKER) == "true"


def worker_id(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """This worker's slot id, or ``None`` outside a worker."""
    env = os.environ if environ is None else environ
    return env.get(_WORKER_ID) if in_worker(env) else None


@attrs.frozen
class WorkerLaunch:
    """
    Everything a worker process is started with, besides its interpreter and script.

    :ivar worker_id: the slot id (``CLUSTER_WORKER_ID``), kept across respawns.
    :ivar master_pid: the master's pid.
    :ivar listeners: listener name (``main``, ``redirect``, ``metrics``) -> descriptor
        number in the worker.
    :ivar config_json: the validated config (:func:`bungate.config.convert.to_json`),
        which the built-in worker serves.
    :ivar tls_copies: ``{copy: original}`` for the master's private certificate copies,
        so a worker's messages name the operator's files.
    :ivar accept_table: ``(descriptor, slot)`` of the shared accept table, or ``None``.
    :ivar limit_table: the descriptor of the shared rate-limit table
        (:meth:`bungate.limit_table.LimitTable.inherited`), or ``None``.
    """

    worker_id: int
    master_pid: int
    listeners: Mapping[str, int] = attrs.field(factory=lambda: {"main": LISTEN_FD})
    config_json: Optional[str] = None
    tls_copies: Mapping[str, str] = attrs.field(factory=dict)
    accept_table: Optional[tuple[int, int]] = None
    limit_table: Optional[int] = None

    @staticmethod
    def layout(extra: Sequence[str], with_table: bool) -> tuple[dict[str, int], Optional[int]]:
        """
        Where a worker finds its descriptors.

        :param extra: the names of the listeners besides ``main``, in order.
        :param with_table: whether the accept table is passed.
        :returns: ``({name: fd}, table fd or None)``.
        """
        fds = {"main": LISTEN_FD}
        for i, name in enumerate(extra):
            fds[name] = _FIRST_EXTRA_FD + i
        table = _FIRST_EXTRA_FD + len(extra) if with_table else None
        return fds, table

    @staticmethod
    def limit_table_fd(extra: Sequence[str], with_table: bool) -> int:
        """
        Where a worker finds the rate-limit table: the first descriptor after the extra
        listeners and the accept table (see :meth:`layout`).

        :param extra: the names of the listeners besides ``main``, in order.
        :param with_table: whether the accept table is passed too.
        :returns: the descriptor number in the worker.
        """
        return _FIRST_EXTRA_FD + len(extra) + (1 if with_table else 0)

    def to_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """
        The worker's environment: ``base`` (the master's, possibly filtered) without any
        stale variable of ours, plus this launch.
        """
        env = {k: v for k, v in base.items() if k not in _OURS}
        env[_WORKER] = "true"
        env[_WORKER_ID] = str(self.worker_id)
        env[_MASTER_PID] = str(self.master_pid)
        env[_FDS] = ",".join(f"{n}={fd}" for n, fd in self.listeners.items() if n != "main")
        if self.config_json is not None:
            env[_CONFIG] = self.config_json
        if self.tls_copies:
            env[_TLS_COPIES] = json.dumps(dict(self.tls_copies))
        if self.accept_table is not None:
            fd, slot = self.accept_table
            env[_ACCEPT_TABLE] = f"{fd}:{slot}"
        if self.limit_table is not None:
            env[_LIMIT_TABLE] = str(self.limit_table)
        return env

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional[WorkerLaunch]:
        """
        The launch this worker was started with, or ``None`` outside a worker. A value
        that does not parse is left out (e.g. no accept table: accept without balancing;
        no rate-limit table: the worker's limits are its own).
        """
        env = os.environ if environ is None else environ
        if not in_worker(env):
            return None
        wid = env.get(_WORKER_ID, "")
        listeners = {"main": LISTEN_FD}
        for item in env.get(_FDS, "").split(","):
            name, sep, fd = item.partition("=")
            if sep and fd.isdigit():
                listeners[name] = int(fd)
        copies: Any
        try:
            copies = json.loads(env.get(_TLS_COPIES) or "{}")
        except ValueError:
            copies = {}
        if not isinstance(copies, dict):
            copies = {}
        fd_text, _, slot_text = env.get(_ACCEPT_TABLE, "").partition(":")
        table = (
            (int(fd_text), int(slot_text)) if fd_text.isdigit() and slot_text.isdigit() else None
        )
        limits_text = env.get(_LIMIT_TABLE, "")
        limits = int(limits_text) if limits_text.isdigit() and limits_text.isascii() else None
        master = env.get(_MASTER_PID, "")
        return cls(
            worker_id=int(wid) if wid.isdigit() else 0,
            master_pid=int(master) if master.isdigit() else os.getppid(),
            listeners=listeners,
            config_json=env.get(_CONFIG) or None,
            tls_copies={str(k): str(v) for k, v in copies.items()},
            accept_table=table,
            limit_table=limits,
        )


class ControlChannel(LineOnlyReceiver):
    """
    One end of a worker's control channel: JSON objects, one per line.

    :param on_message: called with each message (a dict with its kind under ``"t"``).
    :param on_lost: called once when the channel closes after it was open.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(
        self,
        on_message: Callable[[dict[str, Any]], None],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.open = False

    def connectionMade(self) -> None:
        """From now on :meth:`send` writes to the other end."""
        self.open = True

    def send(self, kind: str, **fields: Any) -> None:
        """Send one message (dropped once the channel is gone)."""
        if self.open and self.transport is not None:
            fields["t"] = kind
            self.sendLine(json.dumps(fields, separators=(",", ":")).encode())

    def lineReceived(self, line: bytes) -> None:
        """Pass on a JSON object; anything else is logged and skipped (never trusted)."""
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict) and isinstance(message.get("t"), str):
            self.on_message(message)
        else:
            _log.warn("Ignoring a malformed control message: {line!r}", line=line[:200])

    def close(self) -> None:
        """Close this end."""
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        """Stop sending; if the channel was open, report that the other end is gone."""
        was, self.open = self.open, False
        if was:
            self.on_lost()
