"""
Cluster mode: a master process that supervises a fleet of gateway workers.

The master (:mod:`~bungate.cluster.manager`) binds the listening sockets
(:mod:`~bungate.cluster.sockets`) and runs one slot per worker
(:mod:`~bungate.cluster.process`, restarted by :mod:`~bungate.cluster.policy`); each
worker (:mod:`~bungate.cluster.child`) adopts the sockets and serves requests.
"""
