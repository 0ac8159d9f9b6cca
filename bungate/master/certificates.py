"""
The master's private copies of the certificate, key and CA files its workers load.

When the master takes a config it reads every such file once and copies it into a new
subdirectory (one per config, a *generation*) of this run's private directory (mode
0700, files 0600); the copies are checked, and workers load exactly those bytes. A file
overwritten on disk later therefore reaches no worker, a respawned one included, until a
reload takes it. A generation is deleted once no worker may still read it and it is
neither the accepted one nor the one a reload is trying.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Collection, Mapping
from typing import Any, Callable, Optional, Union

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from bungate.config import GatewayConfig
from bungate.ops.rundir import make_run_dir, sweep_stale_run_dirs
from bungate.ops.tlsfiles import certificate_files, copy_certificate_files

__all__ = ["CertificateCopies", "Prepared", "Validate"]

#: ``validate(config, names)``: raises ``ConfigError`` or returns a Deferred that fails
#: with one; ``names`` maps the copies the config points at to the operator's files.
Validate = Callable[[GatewayConfig, Mapping[str, str]], Union["defer.Deferred[Any]", None]]

log = Logger(namespace="bungate.master")


@attrs.frozen
class Prepared:
    """
    A config with its files copied, not yet accepted.

    :ivar generation: its number.
    :ivar config: the config pointing at the copies (what workers are started with).
    :ivar names: ``{copy: original}``.
    """

    generation: int
    config: GatewayConfig
    names: Mapping[str, str] = attrs.field(factory=dict)


class CertificateCopies:
    """The generations of copies, and which booting worker may still read which."""

    def __init__(self) -> None:
        self.generation = 0  # the accepted generation
        self._last = 0  # the last generation made
        self._dir: Optional[str] = None  # the private directory of this run
        self._copies: dict[int, str] = {}  # generation -> its subdirectory
        self._booting: dict[int, int] = {}  # slot id -> generation its process started with
        self._trying: set[int] = set()  # prepared, neither accepted nor discarded yet

    def prepare(self, config: GatewayConfig) -> Prepared:
        """
        Copy the files ``config`` names into a new generation.

        :raises ConfigError: when a file cannot be read or copied (nothing is left behind).
        """
        self._last += 1
        generation = self._last
        if not certificate_files(config):
            self._trying.add(generation)
            return Prepared(generation, config)
        directory = self._new_dir(generation)
        try:
            copied, originals = copy_certificate_files(config, directory)
        except BaseException:
            self._drop(directory)
            raise
        self._copies[generation] = directory
        self._trying.add(generation)
        log.info(
            "Workers will load {count} certificate/key/CA file(s) from copies in {directory}",
            count=len(originals),
            directory=directory,
        )
        return Prepared(generation, copied, originals)

    def accept(self, prepared: Prepared) -> None:
        """``prepared`` is the config from now on; older generations go once unused."""
        self._trying.discard(prepared.generation)
        self.generation = prepared.generation
        self.prune()

    def discard(self, prepared: Prepared) -> None:
        """``prepared`` was refused: delete its copies (once no booting worker reads them)."""
        self._trying.discard(prepared.generation)
        self.prune()

    def booting(self, slot_id: int, generation: int) -> None:
        """A process of ``slot_id`` starts with ``generation``'s files."""
        self._booting[slot_id] = generation

    def booted(self, slot_id: int) -> None:
        """The process of ``slot_id`` read its files (it is ready), or is gone."""
        self._booting.pop(slot_id, None)
        self.prune()

    def prune(self, keep: Collection[int] = ()) -> None:
        """Delete the copies of generations no one needs any more."""
        needed = {self.generation, *self._trying, *self._booting.values(), *keep}
        for generation in [g for g in self._copies if g not in needed]:
            self._drop(self._copies.pop(generation))

    def remove_all(self) -> None:
        """Delete every copy and the run's directory (the master stops)."""
        for directory in self._copies.values():
            shutil.rmtree(directory, ignore_errors=True)
        self._copies.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _new_dir(self, generation: int) -> str:
        if self._dir is None:
            for stale in sweep_stale_run_dirs("tls"):
                log.info("Removed certificate copies left by a dead master: {path}", path=stale)
            self._dir = make_run_dir("tls")
        return tempfile.mkdtemp(prefix=f"{generation}-", dir=self._dir)

    def _drop(self, directory: str) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        if self._dir is not None and not self._copies:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
