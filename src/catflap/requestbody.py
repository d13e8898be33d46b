"""Reading an HTTP request body through Starlette, within a byte bound.

The control API's ``/start`` and the runtime's ``POST /bot`` both read a JSON body from a peer.
A ``Content-Length`` over the bound is refused before a byte is read, and a body without one
(chunked) is counted as it arrives, so memory never holds more than the bound plus one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request

from catflap.contract.errors import BadRequest, RequestRejected

__all__ = ["read_bounded_body"]


async def read_bounded_body(
    request: Request, limit: int, too_large: Callable[[int], RequestRejected]
) -> bytes:
    """The whole body of ``request``, at most ``limit`` bytes.

    Raises:
        RequestRejected: ``too_large(size)`` when the body is declared or found over ``limit``
            (``size`` is the declared length, or the bytes read so far).
        BadRequest: 400, the client left before its body was complete (or the gateway closed
            it at the body deadline); nobody reads the answer, but it is not a crash either.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large(len(data))
    except ClientDisconnect:
        raise BadRequest("the client disconnected before its body was complete") from None
    return bytes(data)
