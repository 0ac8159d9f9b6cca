"""
The master's private copies of the certificate, key and CA files its workers load.

When the master accepts a config it reads every such file once and copies it into a new
subdirectory (one per accepted config, a *generation*) of this run's private directory
(mode 0700, files 0600); it checks the copies, and workers load exactly those bytes. A
file overwritten on disk later therefore reaches no worker, a respawned one included,
until a reload accepts it. A generation is deleted once no worker may still read it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from typing import Callable, Optional

from twisted.logger import Logger

from bungate.config import GatewayConfig
from bungate.ops.rundir import make_run_dir, sweep_stale_run_dirs
from bungate.ops.tlsfiles import certificate_files, copy_certificate_files

__all__ = ["CertificateCopies", "Validate"]

#: ``validate(config, names)``: raises ``ConfigError``; ``names`` maps copies to originals.
Validate = Callable[[GatewayConfig, Mapping[str, str]], None]

log = Logger(namespace="bungate.master")


class CertificateCopies:
    """The generations of copies, and which booting worker may still read which."""

    def __init__(self) -> None:
        self.generation = 0  # how many configs were accepted
        self._dir: Optional[str] = None  # the private directory of this run
        # generation -> (its subdirectory, {copy: original})
        self._copies: dict[int, tuple[str, dict[str, str]]] = {}
        self._booting: dict[int, int] = {}  # slot id -> generation its process started with

    @property
    def names(self) -> Mapping[str, str]:
        """``{copy: original}`` of the current generation."""
        copies = self._copies.get(self.generation)
        return copies[1] if copies is not None else {}

    def accept(self, config: GatewayConfig, validate: Validate) -> GatewayConfig:
        """
        Copy the files ``config`` names, check the copies, and make them current.

        :returns: ``config`` pointing at the copies (what workers are started with).
        :raises ConfigError: when a file cannot be copied or ``validate`` refuses; the
            current generation and its copies stay as they were.
        """
        generation = self.generation + 1
        worker_config = config
        copies: Optional[tuple[str, dict[str, str]]] = None
        if certificate_files(config):
            directory = self._new_dir(generation)
            try:
                worker_config, originals = copy_certificate_files(config, directory)
                copies = (directory, originals)
                validate(worker_config, originals)
            except BaseException:
                self._drop(directory)
                raise
            self._copies[generation] = copies
            log.info(
                "Workers will load {count} certificate/key/CA file(s) from copies in {directory}",
                count=len(originals),
                directory=directory,
            )
        else:
            validate(config, {})
        self.generation = generation
        self.prune()
        return worker_config

    def booting(self, slot_id: int) -> None:
        """A process of ``slot_id`` starts with the current generation's files."""
        self._booting[slot_id] = self.generation

    def booted(self, slot_id: int) -> None:
        """The process of ``slot_id`` read its files (it is ready), or is gone."""
        self._booting.pop(slot_id, None)
        self.prune()

    def prune(self) -> None:
        """Delete the copies of older configs once no booting worker may still read them."""
        needed = {self.generation, *self._booting.values()}
        for generation in [g for g in self._copies if g not in needed]:
            directory, _ = self._copies.pop(generation)
            self._drop(directory)

    def remove_all(self) -> None:
        """Delete every copy and the run's directory (the master stops)."""
        for directory, _ in self._copies.values():
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
