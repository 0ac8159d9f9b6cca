"""
Running as a classic daemon: the user and group the gateway runs as (``server.user``,
``server.group``), dropping root once the sockets are bound, and the options ``twist
bungate`` passes to the process beyond its config (``--pidfile``).

The order a master started as root follows: bind the listeners (ports below 1024 need
root), make its private directories (metrics files, certificate copies) and hand them to
the user, write the pid file, then :meth:`Identity.drop`: supplementary groups, group, user,
for good (the saved ids too, so root cannot be taken back). Every worker is started after
that, and so runs as the user too.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from typing import Optional

import attrs

from bungate.config import ConfigError, GatewayConfig

__all__ = ["Identity", "ProcessOptions", "process_options", "resolve_identity"]


@attrs.frozen
class ProcessOptions:
    """
    What the command line asked of this process beyond its config.

    :ivar pidfile: ``--pidfile``: where the master (or the single process) writes its pid
        once it listens.
    """

    pidfile: Optional[str] = None


_options = [ProcessOptions()]


def process_options(options: Optional[ProcessOptions] = None) -> ProcessOptions:
    """
    The options of this process: set by ``twist bungate`` (with ``options``) before the
    gateway starts, read by the master when it starts.

    :param options: the new options, or ``None`` to only read them.
    :returns: the options in force.
    """
    if options is not None:
        _options[0] = options
    return _options[0]


@attrs.frozen
class Identity:
    """
    The user and group to run as.

    :ivar user: the user's name (``None`` when only ``server.group`` was given).
    :ivar uid: the user id to switch to (``None``: keep the current one).
    :ivar gid: the group id to switch to.
    :ivar group: the group's name.
    :ivar home: the user's home directory (for ``HOME``), if a user was given.
    """

    user: Optional[str]
    uid: Optional[int]
    gid: int
    group: str
    home: Optional[str] = None

    @property
    def needed(self) -> bool:
        """Whether this process is not already running as this user and group."""
        return (self.uid is not None and os.geteuid() != self.uid) or os.getegid() != self.gid

    def describe(self) -> str:
        """``user nobody (65534), group nogroup (65534)``, for the log."""
        who = f"user {self.user} ({self.uid}), " if self.user is not None else ""
        return f"{who}group {self.group} ({self.gid})"

    def chown(self, paths: Iterable[str]) -> None:
        """
        Give ``paths`` (and, for directories, everything below them) to this user and
        group; a no-op unless this process is root.

        :raises OSError: a path cannot be changed.
        """
        if os.geteuid() != 0:
            return
        uid = -1 if self.uid is None else self.uid
        for top in paths:
            os.chown(top, uid, self.gid, follow_symlinks=False)
            if os.path.isdir(top) and not os.path.islink(top):
                for root, dirs, files in os.walk(top):
                    for name in [*dirs, *files]:
                        os.chown(os.path.join(root, name), uid, self.gid, follow_symlinks=False)

    def drop(self) -> None:
        """
        Become this user and group for good: supplementary groups, then the group, then
        the user (real, effective and saved ids), and set ``HOME``, ``USER`` and
        ``LOGNAME`` for the processes started from now on.

        :raises PermissionError: the process is not root, or root could be taken back.
        """
        if not self.needed:
            return
        if self.user is not None:
            os.initgroups(self.user, self.gid)
        else:
            os.setgroups([self.gid])
        os.setresgid(self.gid, self.gid, self.gid)
        if self.uid is not None:
            os.setresuid(self.uid, self.uid, self.uid)
            if self.uid != 0:
                try:
                    os.setuid(0)
                except PermissionError:
                    pass
                else:
                    raise PermissionError("root could be taken back after dropping privileges")
            os.environ["USER"] = os.environ["LOGNAME"] = str(self.user)
            if self.home:
                os.environ["HOME"] = self.home


def resolve_identity(config: GatewayConfig) -> Optional[Identity]:
    """
    The identity ``server.user`` / ``server.group`` name, looked up now (the lookups may
    read ``/etc/passwd``, NSS, LDAP: this is why the config parser does not).

    :returns: ``None`` when neither key is set.
    :raises ConfigError: naming the key: an unknown user or group, or a switch that needs
        root in a process that is not root.
    """
    server = config.server
    if server.user is None and server.group is None:
        return None
    source = config.source
    uid: Optional[int] = None
    home: Optional[str] = None
    gid: Optional[int] = None
    if server.user is not None:
        try:
            entry = pwd.getpwuid(int(server.user)) if server.user.isdigit() else None
            entry = entry or pwd.getpwnam(server.user)
        except (KeyError, OverflowError):
            raise ConfigError(source, "server.user", f"no such user {server.user!r}") from None
        uid, gid, home = entry.pw_uid, entry.pw_gid, entry.pw_dir
        user: Optional[str] = entry.pw_name
    else:
        user = None
    if server.group is not None:
        try:
            if server.group.isdigit():
                group_entry = grp.getgrgid(int(server.group))
            else:
                group_entry = grp.getgrnam(server.group)
        except (KeyError, OverflowError):
            raise ConfigError(source, "server.group", f"no such group {server.group!r}") from None
        gid, group = group_entry.gr_gid, group_entry.gr_name
    else:
        assert gid is not None
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
    identity = Identity(user=user, uid=uid, gid=gid, group=group, home=home)
    if identity.needed and os.geteuid() != 0:
        key = "server.user" if uid is not None and uid != os.geteuid() else "server.group"
        raise ConfigError(
            source,
            key,
            f"running as {identity.describe()} needs the gateway to start as root; it "
            f"runs as uid {os.geteuid()} (start it as root, or drop the key when the "
            "service manager starts it as that user already)",
        )
    return identity
