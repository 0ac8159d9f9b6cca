"""
What the gateway needs to be operated (internal): log output, metrics, certificate
files and run directories, shared by the master and the workers.
"""

__all__: list[str] = []
