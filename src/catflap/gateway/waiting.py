"""Admitting a session while its client is watched: a client that leaves cancels the work."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from catflap.contract import limits

if TYPE_CHECKING:
    from catflap.gateway.front import GatewayConnection

__all__ = ["ClientLeft", "while_client_waits"]

T = TypeVar("T")


class ClientLeft(Exception):
    """The client closed its connection while its session was being admitted."""


async def while_client_waits(
    conn: GatewayConnection, admission: Coroutine[Any, Any, T]
) -> tuple[T, bytes]:
    """Run ``admission`` while reading the client, so that its departure cancels it.

    A paused transport would notice neither a FIN nor a reset, and a session would be started
    (token spent, instance cold-started, ``bot()`` run) for nobody. A WebSocket client sends
    nothing before the 101, so what it does send meanwhile is kept, bounded, for the relay.

    Returns:
        What ``admission`` returned, and the bytes the client sent meanwhile.

    Raises:
        ClientLeft: the client went away; ``admission`` was cancelled (and gave back what it
            held).
    """
    task = asyncio.ensure_future(admission)
    early = bytearray()

    def sink(data: bytes | None) -> None:
        if data is None:
            task.cancel()
            return
        early.extend(data)
        if len(early) > limits.RELAY_HIGH_WATER_BYTES and not conn.transport.is_closing():
            conn.transport.pause_reading()  # a client that will not wait: TCP holds the rest

    if conn.lost:
        task.cancel()
    else:
        conn.sink = sink
        conn.transport.resume_reading()
    try:
        result = await task
    except asyncio.CancelledError:
        if conn.lost and not _cancelling():
            raise ClientLeft from None
        raise
    finally:
        conn.sink = None
        if not conn.transport.is_closing():
            conn.transport.pause_reading()
    return result, bytes(early)


def _cancelling() -> bool:
    """True when the running task itself is being cancelled (shutdown), not just its child."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0
