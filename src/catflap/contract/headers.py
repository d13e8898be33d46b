"""Header and query-parameter names of both hops, defined once.

All header names are lower-case bytes/str as they appear after parsing (HTTP header names are
case-insensitive; catflap compares lower-case).
"""

from __future__ import annotations

__all__ = [
    "AGENT_HOP_PREFIXES",
    "AGENT_PATH",
    "BOT_PATH",
    "DAILY_ROOM_TOKEN_HEADER",
    "DAILY_TRANSPORT_TYPE_HEADER",
    "DAILY_ROOM_URL_HEADER",
    "MAX_SESSION_SECONDS_HEADER",
    "QUERY_BODY",
    "QUERY_SERVICE_HOST",
    "QUERY_TOKEN",
    "RUNTIME_PATHS",
    "SESSION_ID_HEADER",
    "TRANSPORT_TYPE_HEADER",
    "TRANSPORT_TYPE_WEBRTC",
    "TRANSPORT_TYPE_WEBSOCKET",
    "WEBRTC_OFFER_PATH",
]

#: The session id, on the gateway -> agent upgrade (PCC base image reads this header).
SESSION_ID_HEADER = "x-daily-session-id"
#: Tells the runtime to set ``args.transport_type``. Absent means ``None`` (pipecat
#: auto-detects the telephony provider). PCC does not document its own mechanism; this name is
#: catflap's.
TRANSPORT_TYPE_HEADER = "x-catflap-transport-type"
#: The only value of :data:`TRANSPORT_TYPE_HEADER`: a plain, non-telephony WebSocket client.
TRANSPORT_TYPE_WEBSOCKET = "websocket"
#: The session budget in seconds (PCC base image >= 0.1.27 reads it on ``POST /bot``; catflap
#: sends it on ``/ws`` too, and the runtime cancels ``bot()`` when it runs out).
MAX_SESSION_SECONDS_HEADER = "x-pcc-max-session-seconds"

#: Header name prefixes that only catflap sets on the gateway -> agent hop (the session id, its
#: budget, the transport type, the Daily room): a client's own are dropped, so none can be
#: spoofed, on the upgrade and through the session proxy alike.
AGENT_HOP_PREFIXES = ("x-daily-", "x-catflap-", "x-pcc-")

#: The Daily room a ``POST /bot`` session joins, and its meeting token (PCC base image).
DAILY_ROOM_URL_HEADER = "x-daily-room-url"
DAILY_ROOM_TOKEN_HEADER = "x-daily-room-token"
#: PCC's ``POST /bot`` header naming the session's transport; its one value,
#: :data:`TRANSPORT_TYPE_WEBRTC`, makes the runtime wait for a SmallWebRTC offer.
DAILY_TRANSPORT_TYPE_HEADER = "x-daily-transport-type"
TRANSPORT_TYPE_WEBRTC = "webrtc"

#: The agent runtime's WebSocket route (PCC base image).
AGENT_PATH = "/ws"
#: The agent runtime's route for sessions without a transport, held until ``bot()`` ends.
BOT_PATH = "/bot"
#: SmallWebRTC signalling (PCC base image): ``POST`` an offer, ``PATCH`` trickled candidates.
#: A runtime route that the session proxy reaches, so not one of :data:`RUNTIME_PATHS`.
WEBRTC_OFFER_PATH = "/api/offer"
#: The agent runtime's own paths: a bot may not declare a route on one (the start fails), and
#: the gateway's session proxy never forwards a request to one (or below one). PCC's
#: ``/api/offer`` (SmallWebRTC signalling) is a bot route, not one of these.
RUNTIME_PATHS = (AGENT_PATH, BOT_PATH, "/livez", "/readyz", "/metrics")

#: Query parameters of the public WebSocket URL.
QUERY_BODY = "body"
QUERY_TOKEN = "token"
QUERY_SERVICE_HOST = "serviceHost"
