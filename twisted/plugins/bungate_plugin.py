"""The ``twist bungate`` plugin: a thin IServiceMaker over bungate.tap."""

from twisted.application.service import ServiceMaker

bungate = ServiceMaker(
    "bungate",
    "bungate.tap",
    "HTTP API gateway: a master supervising a fleet of reverse-proxy workers",
    "bungate",
)
