"""
What the gateway needs to be operated (internal): log output, metrics, certificate
files and run directories, shared by the master and the workers; and what makes the
master a good citizen of its supervisor: systemd's notifications and socket activation,
the pid file, the user it runs as, the resources of its processes.
"""

__all__: list[str] = []
