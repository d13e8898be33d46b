"""``GET /metrics``: who may read the gateway's metrics, on the main port or a listener of its own.

The metrics name every organization and agent, and count their sessions and refusals, so they
are not for anyone who can reach the gateway. ``[gateway]`` settings decide (one rule,
:func:`metrics_refusal`, for both places):

=======================  ===================================================================
neither set (default)    main port; loopback clients only (127.0.0.0/8, ::1), else 403
                         ``metrics_forbidden``. A request with a proxy's forwarding header
                         (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) is not loopback:
                         a proxy on this host relays someone else's request.
``metrics_key``          wherever /metrics is served: ``Authorization: Bearer <key>``, else
                         401 (compared in constant time; the key is never logged or echoed)
``metrics_listen``       only on that ``host:port`` (the main port answers 404
                         ``not_found``); anyone who reaches it may read, unless a key is set
=======================  ===================================================================

The separate listener is :mod:`catflap.gateway.metricslistener`; it applies the same rule.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from catflap.api.auth import bearer_credentials
from catflap.contract.errors import (
    MetricsForbidden,
    NotFound,
    RequestRejected,
    Unauthorized,
)
from catflap.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from catflap.config import GatewaySettings
    from catflap.metrics import GatewayMetrics

__all__ = [
    "METRICS_PATH",
    "PROXY_HEADERS",
    "is_loopback",
    "metrics_refusal",
    "metrics_router",
]


METRICS_PATH = "/metrics"
#: Headers a reverse proxy adds for the client it relays; their presence means the TCP peer
#: (perhaps 127.0.0.1) is not the client.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a peer address as text) is on loopback: 127.0.0.0/8, ``::1``, or an
    IPv4-mapped 127.x address (a dual-stack socket's view of an IPv4 loopback peer).

    Anything else is not: names, Unix sockets (``None``), unparsable text.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return address == ipaddress.IPv6Address("::1")
        address = mapped
    return address in _LOOPBACK_V4


def metrics_refusal(
    settings: GatewaySettings,
    *,
    on_listener: bool,
    authorization: str | None,
    client_host: str | None,
    proxied: bool,
) -> RequestRejected | None:
    """Why this ``GET /metrics`` may not be answered, or None when it may.

    Args:
        settings: the gateway's ``[gateway]`` settings.
        on_listener: the request came to the ``metrics_listen`` listener, not the main port.
        authorization: the ``Authorization`` header, if any.
        client_host: the client's address as the HTTP server saw it.
        proxied: the request carries one of :data:`PROXY_HEADERS`.
    """
    if settings.metrics_listen is not None and not on_listener:
        # Not "served elsewhere": the main port does not say where the metrics are.
        return NotFound("not found")
    if settings.metrics_key is not None:
        presented = bearer_credentials(authorization)
        expected = settings.metrics_key.get_secret_value().encode()
        # compare_digest on bytes: constant time for equal lengths, and no TypeError for a
        # header with non-ASCII characters.
        if presented is None or not hmac.compare_digest(presented.encode(), expected):
            return Unauthorized(
                "GET /metrics needs Authorization: Bearer <[gateway] metrics_key>",
                headers=[("www-authenticate", 'Bearer realm="catflap metrics"')],
            )
        return None
    if on_listener:
        return None  # the operator chose who can reach metrics_listen
    if proxied or not is_loopback(client_host):
        return MetricsForbidden(
            "GET /metrics is served to loopback clients only: set [gateway] metrics_key, or "
            "metrics_listen for a separate metrics port"
        )
    return None


def metrics_router(*, settings: GatewaySettings, metrics: GatewayMetrics) -> APIRouter:
    """``GET /metrics`` on the main port (the control API's FastAPI app).

    Args:
        settings: ``[gateway]``: who may read (``metrics_key``, ``metrics_listen``).
        metrics: what is rendered.
    """
    router = APIRouter()

    @router.get(METRICS_PATH, include_in_schema=False)
    async def render(request: Request) -> Response:
        refusal = metrics_refusal(
            settings,
            on_listener=False,
            authorization=request.headers.get("authorization"),
            client_host=request.client.host if request.client else None,
            proxied=any(name in request.headers for name in PROXY_HEADERS),
        )
        if refusal is not None:
            raise refusal
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router
