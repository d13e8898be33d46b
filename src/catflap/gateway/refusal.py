"""Refusing a request or a stream: the one place that logs it, counts it and answers it.

Before the upgrade a refusal is an HTTP error (:func:`~catflap.contract.errors.http_error_response`
with a lingering close, written by the connection); after the gateway itself accepted a
provider's WebSocket, it is a close frame. Either way it is counted in
``catflap_handshake_refusals`` (status, or close code, and reason) and, within the refusal log
budget, logged: a flood of refusals must not flood the log.
"""

from __future__ import annotations

from typing import Protocol

from catflap.contract.closecodes import CloseCode
from catflap.contract.errors import RequestRejected, TokenRejected
from catflap.gateway.httphead import RequestHead
from catflap.gateway.sessionlog import accepted_log, loggable
from catflap.gateway.upgrade import UpgradeAccepted
from catflap.logs import SessionLog, not_logged, refusal_log_budget
from catflap.metrics import GatewayMetrics

__all__ = ["Refusable", "Refusals"]

#: The reason counted for a provider stream whose opening messages were refused.
PROVIDER_HANDSHAKE_REASON = "provider_handshake"


class Refusable(Protocol):
    """A client connection the gateway can still answer (``GatewayConnection``)."""

    def answer(self, rejected: RequestRejected) -> None:
        """Send the JSON error and close; nothing was upgraded."""

    def close_websocket(self, code: CloseCode, reason: str) -> None:
        """Close a WebSocket the gateway accepted itself."""


class Refusals:
    """Counts, logs and answers every refusal of one gateway."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def count(self, status: str, rejected: RequestRejected) -> None:
        """Count a refusal (``status`` is an HTTP status, or a close code after the upgrade)."""
        self._metrics.refusals.labels(status, rejected.to_body()["code"]).inc()
        if isinstance(rejected, TokenRejected):
            self._metrics.token_verifications.labels(rejected.reason).inc()

    def count_tls(self, reason: str) -> None:
        """Count a connection to ``listen_tls`` closed before any HTTP (status ``tls``):
        ``tls_handshake_failed``, ``tls_handshake_timeout`` or ``not_tls``."""
        self._metrics.refusals.labels("tls", reason).inc()

    def count_token(self, result: str) -> None:
        """Count a token check that did not end in a refusal (``ok``)."""
        self._metrics.token_verifications.labels(result).inc()

    def reject(self, conn: Refusable, rejected: RequestRejected) -> None:
        """Count and answer a refusal that is not logged (a head that never completed, a
        connection over budget, an unexpected error already logged)."""
        self.count(str(rejected.status), rejected)
        conn.answer(rejected)

    def refuse(
        self,
        conn: Refusable,
        head: RequestHead,
        rejected: RequestRejected,
        accepted: UpgradeAccepted | None,
    ) -> None:
        """Log (within the budget), count and answer the refusal of an upgrade request."""
        skipped = refusal_log_budget.take()
        if skipped is not None:
            accepted_log(accepted).info(
                "! %s %s -> %d %s%s",
                head.method,
                loggable(head.path),
                rejected.status,
                rejected.to_body()["code"],
                not_logged(skipped),
            )
        self.reject(conn, rejected)

    def refused_by_api(self, rejected: RequestRejected, what: str) -> None:
        """Log (within the budget) and count a refusal the control API answers itself (its
        exception handler writes the response): ``what`` names the request."""
        skipped = refusal_log_budget.take()
        if skipped is not None:
            accepted_log(None).info(
                "! %s -> %d %s%s",
                what,
                rejected.status,
                rejected.to_body()["code"],
                not_logged(skipped),
            )
        self.count(str(rejected.status), rejected)

    def close_stream(
        self,
        conn: Refusable,
        code: CloseCode,
        rejected: RequestRejected,
        slog: SessionLog,
        *,
        provider: str,
        reason: str | None = None,
    ) -> None:
        """Log, count and close an accepted WebSocket whose session cannot start (routing,
        token or capacity found once the provider named its agent)."""
        self.count(str(int(code)), rejected)
        slog.info("! %s: %s", provider, rejected.message)
        conn.close_websocket(code, rejected.message if reason is None else reason)

    def opening_refused(
        self,
        conn: Refusable,
        code: CloseCode,
        reason: str,
        slog: SessionLog,
        *,
        provider: str,
        path: str,
    ) -> None:
        """Log (within the budget), count and close a stream whose opening messages were not
        the provider's."""
        self._metrics.refusals.labels(str(int(code)), PROVIDER_HANDSHAKE_REASON).inc()
        skipped = refusal_log_budget.take()
        if skipped is not None:
            slog.info("! %s %s: %s%s", provider, loggable(path), reason, not_logged(skipped))
        conn.close_websocket(code, reason)
