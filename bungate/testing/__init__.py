"""
Test helpers shipped with bungate, for our tests and for plugin authors' tests (as
``treq.testing`` is for treq).

Real ones, over real processes and sockets on 127.0.0.1:

- :class:`UpstreamServer`: a real HTTP upstream in the test's reactor, with endpoints that
  misbehave on request (slow, huge, reset mid-body, ...);
- :class:`CapturingUpstream`: a raw upstream that records exactly the bytes each request
  arrived with (:class:`CapturedRequest`), to assert what a gateway passed on;
- :class:`GatewayProcess`: ``twist bungate`` in a real child process; tests wait for its
  log lines (events), send it signals and find its workers (:func:`find_workers`);
- :func:`wait_until`: poll a condition on the reactor with a bounded timeout.

In-memory ones, for the fleet's logic without processes:

- :class:`FakeProcessReactor`: a ``Clock`` that also spawns fake worker processes and
  adopts fake control channels;
- :class:`FakeWorker`: one spawned fake process; the test makes it report ready, send
  heartbeats, or exit.

Everything waits on events with a deadline; nothing sleeps and hopes.
"""

from bungate.testing._capture import CapturedRequest, CapturingUpstream
from bungate.testing._fakes import FakeProcessReactor, FakeWorker
from bungate.testing._process import GatewayProcess, find_workers
from bungate.testing._upstream import UpstreamServer
from bungate.testing._wait import wait_until

__all__ = [
    "CapturedRequest",
    "CapturingUpstream",
    "FakeProcessReactor",
    "FakeWorker",
    "GatewayProcess",
    "UpstreamServer",
    "find_workers",
    "wait_until",
]
