"""Twisted's stock reverse proxy in one process: the baseline bungate must beat.

Usage::

    python bench/stock_proxy.py PORT UPSTREAM_PORT

Serves ``twisted.web.proxy.ReverseProxyResource`` on ``127.0.0.1:PORT`` forwarding every
path to ``127.0.0.1:UPSTREAM_PORT``, exactly as its documentation shows: no connection
pool, one new upstream connection per request, no logging.
"""

import sys

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


def main(argv):
    """
    Listen on the given port and proxy to the given upstream port until killed.

    :param argv: ``[PORT, UPSTREAM_PORT]``.
    """
    port, upstream_port = (int(a) for a in argv)
    site = Site(ReverseProxyResource("127.0.0.1", upstream_port, b""))
    site.log = lambda request: None  # the access log is off for every contender
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
