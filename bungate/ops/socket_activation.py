"""
Listening sockets handed over by systemd (socket activation), matched to the listeners the
config asks for.

With a ``.socket`` unit (or ``systemd-socket-activate`` by hand), systemd binds the
sockets itself and starts the service with them open at descriptors ``3, 4, ...``, saying
so in the environment: ``LISTEN_PID`` (the process they are meant for), ``LISTEN_FDS``
(how many) and, optionally, ``LISTEN_FDNAMES`` (colon-separated names, from
``FileDescriptorName=``). The master then adopts them instead of binding: a restart of the
service never closes the port, and the gateway can listen on port 80 without root.

Matching a passed socket to a listener (:func:`match_listeners`):

1. **By name.** A socket whose ``LISTEN_FDNAMES`` entry equals a listener's name
   (``main``, ``redirect``, ``metrics``) serves that listener, whatever its address: the
   unit file then decides where the gateway listens. If several sockets carry the name,
   the one whose address also matches is preferred, else the first.
2. **By address**, for the listeners left: the port must be equal (a wanted port ``0``
   means any port) and the host equal, tried first; then a wildcard host:

   - ``0.0.0.0`` takes a socket bound to ``0.0.0.0``, or to ``::`` in dual-stack mode
     (``IPV6_V6ONLY`` off), which also accepts IPv4 clients. That is what a bare
     ``ListenStream=3000`` gives on Linux, while the config's default host is ``0.0.0.0``.
   - ``::`` takes a socket bound to ``::`` (dual-stack or not: ``BindIPv6Only=`` in the
     unit is the operator's choice), never one bound to ``0.0.0.0``, which would leave
     IPv6 clients out.
   - ``""`` takes either family's wildcard.

Every listener must get a socket and every socket must be wanted; otherwise
:class:`ActivationError` names all of the mismatches at once.

Twisted takes the variables away: importing ``twisted.internet.endpoints`` (which ``twist``
does while it loads plugins, and ``import bungate`` does too) deletes ``LISTEN_PID`` and
``LISTEN_FDS`` from ``os.environ`` for its own ``systemd:`` endpoint, and setproctitle
later overwrites the memory ``/proc/self/environ`` shows. So this module, when imported,
copies the ``LISTEN_*`` variables the process was started with from
``/proc/self/environ``; :func:`inherited_sockets` and :func:`unset_environment` called
without an ``environ`` read and clear that copy together with ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Optional

import attrs

__all__ = [
    "ENVIRONMENT",
    "FIRST_FD",
    "ActivationError",
    "InheritedSocket",
    "describe",
    "inherited_sockets",
    "match_listeners",
    "unset_environment",
]

FIRST_FD = 3
"""The first descriptor systemd passes (``SD_LISTEN_FDS_START``)."""

ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
"""The variables of the protocol (removed by :func:`unset_environment`)."""

_SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _read_start_environ(path: str = "/proc/self/environ") -> dict[str, str]:
    """The ``LISTEN_*`` variables this process was started with (Linux), if they are ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        name = key.decode("ascii", "replace")
        if sep and name in ENVIRONMENT:
            found[name] = value.decode("utf-8", "surrogateescape")
    if found.get("LISTEN_PID") != str(os.getpid()):
        return {}
    return found


# Taken at import, before setproctitle can overwrite it (see the module docstring).
_started_with: dict[str, str] = _read_start_environ()


def _process_environ() -> Mapping[str, str]:
    if "LISTEN_PID" in os.environ:
        return os.environ
    return dict(_started_with)


class ActivationError(Exception):
    """The sockets systemd passed cannot be used as they are; the message says why."""


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class InheritedSocket:
    """
    One listening socket passed by systemd.

    :ivar fd: its descriptor number.
    :ivar sock: the socket object owning the descriptor (non-blocking, inheritable).
    :ivar name: its ``LISTEN_FDNAMES`` entry, or ``None`` when no names were given.
    :ivar family: ``AF_INET`` or ``AF_INET6``.
    :ivar socktype: always ``SOCK_STREAM`` (anything else is refused).
    :ivar host: the local address it is bound to, e.g. ``0.0.0.0`` or ``::``.
    :ivar port: the local port.
    :ivar dual_stack: an IPv6 socket that accepts IPv4 clients too (``IPV6_V6ONLY`` off).
    """

    fd: int
    sock: socket.socket = attrs.field(eq=False, repr=False)
    name: Optional[str]
    family: socket.AddressFamily
    socktype: socket.SocketKind
    host: str
    port: int
    dual_stack: bool = False

    @property
    def address(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        return _format_address(self.host, self.port)

    @classmethod
    def from_socket(cls, sock: socket.socket, name: Optional[str] = None) -> InheritedSocket:
        """
        Check that ``sock`` is a listening TCP socket and describe it.

        Makes it non-blocking and inheritable, as the master's own listeners are.

        :param sock: the socket (it stays owned by the caller until adopted).
        :param name: its name, if systemd gave one.
        :returns: the description.
        :raises ActivationError: ``sock`` is not a listening TCP stream socket.
        """
        fd = sock.fileno()
        if sock.family not in _TCP_FAMILIES:
            raise ActivationError(
                f"fd {fd} is a {_family_name(sock.family)} socket, not TCP: "
                "bungate adopts only IPv4 or IPv6 stream sockets (ListenStream=host:port)"
            )
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(
                f"fd {fd} is a {_type_name(sock.type)} socket, not a stream: bungate adopts "
                "only TCP listeners (ListenStream=, not ListenDatagram=)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN):
            raise ActivationError(
                f"fd {fd} is a TCP socket that is not listening (a connection, or "
                "Accept=yes in the .socket unit): bungate needs the listening socket"
            )
        sockname = sock.getsockname()
        host, port = str(sockname[0]), int(sockname[1])
        dual_stack = False
        if sock.family == socket.AF_INET6:
            dual_stack = not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        sock.setblocking(False)
        sock.set_inheritable(True)
        return cls(
            fd=fd,
            sock=sock,
            name=name,
            family=socket.AddressFamily(sock.family),
            socktype=socket.SocketKind(sock.type),
            host=host,
            port=port,
            dual_stack=dual_stack,
        )


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def _type_name(kind: int) -> str:
    try:
        return socket.SocketKind(kind).name
    except ValueError:
        return f"type {kind}"


def _count(environ: Mapping[str, str]) -> int:
    raw = environ.get("LISTEN_FDS", "")
    try:
        count = int(raw)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={raw!r} is not a number of descriptors") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={raw!r} is negative")
    return count


def inherited_sockets(
    environ: Optional[Mapping[str, str]] = None, *, pid: Optional[int] = None
) -> list[InheritedSocket]:
    """
    The listening sockets systemd passed to this process.

    :param environ: where to read ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``;
        by default ``os.environ``, or where Twisted removed them from there, the copy
        taken when this module was imported (see the module docstring).
    :param pid: this process's id; :func:`os.getpid` by default.
    :returns: one entry per descriptor ``3 .. 3+LISTEN_FDS-1``, in order; an empty list
        when ``LISTEN_PID`` is unset or names another process (the variables were meant
        for a parent that did not remove them).
    :raises ActivationError: the variables are malformed, or a descriptor is not open or
        not a listening TCP stream socket. Descriptors already wrapped are detached (left
        open, not closed) before raising.
    """
    if environ is None:
        environ = _process_environ()
    listen_pid = environ.get("LISTEN_PID", "")
    if not listen_pid:
        return []
    try:
        target = int(listen_pid)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={listen_pid!r} is not a process id") from None
    if target != (os.getpid() if pid is None else pid):
        return []
    count = _count(environ)
    names: list[Optional[str]] = [None] * count
    raw_names = environ.get("LISTEN_FDNAMES")
    if raw_names is not None and count:
        given = raw_names.split(":")
        if len(given) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES={raw_names!r} names {len(given)} descriptors but "
                f"LISTEN_FDS={count}"
            )
        names = [name or None for name in given]
    found: list[InheritedSocket] = []
    try:
        for index in range(count):
            fd = FIRST_FD + index
            try:
                mode = os.fstat(fd).st_mode
            except OSError as e:
                raise ActivationError(
                    f"LISTEN_FDS={count} but fd {fd} is not open ({e.strerror})"
                ) from None
            if not stat.S_ISSOCK(mode):
                raise ActivationError(f"fd {fd} is not a socket (LISTEN_FDS={count})")
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                raise ActivationError(f"fd {fd} cannot be used as a socket: {e}") from None
            try:
                found.append(InheritedSocket.from_socket(sock, names[index]))
            except BaseException:
                sock.detach()
                raise
    except BaseException:
        for inherited in found:
            inherited.sock.detach()
        raise
    return found


def unset_environment(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """
    Remove the activation variables once read, so that no worker ever sees them and a
    second :func:`inherited_sockets` finds nothing to adopt twice.

    :param environ: the environment to clean; by default ``os.environ`` and the copy
        taken at import.
    """
    if environ is None:
        _started_with.clear()
        environ = os.environ
    for name in ENVIRONMENT:
        environ.pop(name, None)


def _ip(host: str) -> Optional[str]:
    """The canonical text of an IP literal, or ``None`` for a host name."""
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def _resolve(host: str) -> set[str]:
    """The addresses ``host`` stands for (itself when it is an IP literal)."""
    literal = _ip(host)
    if literal is not None:
        return {literal}
    try:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ip for ip in (_ip(str(info[4][0])) for info in infos) if ip is not None}


def _exact(host: str, inherited: InheritedSocket) -> bool:
    return _ip(inherited.host) in _resolve(host) if host else False


def _wildcard(host: str, inherited: InheritedSocket) -> bool:
    bound = _ip(inherited.host)
    v4_any = bound == "0.0.0.0" and inherited.family == socket.AF_INET
    v6_any = bound == "::" and inherited.family == socket.AF_INET6
    if host == "":
        return v4_any or v6_any
    wanted = _ip(host)
    if wanted == "0.0.0.0":
        return v4_any or (v6_any and inherited.dual_stack)
    if wanted == "::":
        return v6_any
    return False


def _port_fits(port: int, inherited: InheritedSocket) -> bool:
    return port == 0 or port == inherited.port


def match_listeners(
    inherited: Sequence[InheritedSocket], wanted: Sequence[tuple[str, str, str, int]]
) -> dict[str, socket.socket]:
    """
    Give each wanted listener one of the passed sockets (rules in the module docstring).

    :param inherited: what :func:`inherited_sockets` found.
    :param wanted: the listeners as the master describes them:
        ``(name, config key, host, port)``, e.g. ``("main", "server.port", "0.0.0.0",
        3000)``; port ``0`` accepts any port.
    :returns: listener name → socket, in the order of ``wanted``.
    :raises ActivationError: naming every listener without a socket and every socket no
        listener wants.
    """
    free = list(inherited)
    chosen: dict[str, InheritedSocket] = {}

    def take(name: str, candidate: InheritedSocket) -> None:
        chosen[name] = candidate
        free.remove(candidate)

    def fits(host: str, port: int, candidate: InheritedSocket) -> bool:
        return _port_fits(port, candidate) and (
            _exact(host, candidate) or _wildcard(host, candidate)
        )

    # 1. names given by systemd (FileDescriptorName=)
    for name, _key, host, port in wanted:
        named = [candidate for candidate in free if candidate.name == name]
        if named:
            by_address = [candidate for candidate in named if fits(host, port, candidate)]
            take(name, (by_address or named)[0])
    # 2. the same address, then 3. a wildcard of a compatible family; a fixed port is
    # tried before "any port" so that port 0 never takes a socket meant for another.
    for test in (_exact, _wildcard):
        for any_port in (False, True):
            for name, _key, host, port in wanted:
                if name in chosen or (port == 0) != any_port:
                    continue
                for candidate in free:
                    if _port_fits(port, candidate) and test(host, candidate):
                        take(name, candidate)
                        break

    problems = [
        f"systemd passed {candidate.address} (fd {candidate.fd}"
        + (f", named {candidate.name!r}" if candidate.name else "")
        + "), which no listener asks for"
        for candidate in free
    ]
    for name, key, host, port in wanted:
        if name not in chosen:
            where = _format_address(host or "*", port) + (" (any port)" if port == 0 else "")
            problems.append(f"{key} wants {where} but systemd passed no socket for it")
    if problems:
        raise ActivationError(
            "; ".join(problems) + " (make ListenStream= in the .socket unit match the "
            "config, or name each socket after its listener with FileDescriptorName=)"
        )
    return {name: chosen[name].sock for name, _key, _host, _port in wanted}


def describe(inherited: Sequence[InheritedSocket]) -> str:
    """
    A one-line summary for the start log.

    :param inherited: the adopted sockets.
    :returns: e.g. ``adopted 2 sockets from systemd (LISTEN_FDS): main=0.0.0.0:3000,
        metrics=127.0.0.1:9100``; sockets without a name are shown as ``fd N``.
    """
    if not inherited:
        return "adopted no sockets from systemd (LISTEN_FDS)"
    noun = "socket" if len(inherited) == 1 else "sockets"
    parts = ", ".join(f"{item.name or f'fd {item.fd}'}={item.address}" for item in inherited)
    return f"adopted {len(inherited)} {noun} from systemd (LISTEN_FDS): {parts}"
