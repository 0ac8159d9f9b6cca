"""
The built-in balancing strategies, registered like any third-party plugin.

Each strategy class provides :class:`twisted.plugin.IPlugin` and
:class:`bungate.interfaces.IBalancerFactory`; naming it at module level here is all a
plugin module needs.
"""

from bungate.core.balancing import (
    IpHash,
    Latency,
    LeastConnections,
    PowerOfTwoChoices,
    RandomChoice,
    RoundRobin,
    Weighted,
    WeightedLeastConnections,
)

__all__ = [
    "IpHash",
    "Latency",
    "LeastConnections",
    "PowerOfTwoChoices",
    "RandomChoice",
    "RoundRobin",
    "Weighted",
    "WeightedLeastConnections",
]
