"""Every limit of the contract, defined once, each with the reason for its value.

The config dataclasses and the CLI build their defaults from these names; nothing else in the
code base writes these numbers again.
"""

from __future__ import annotations

__all__ = [
    "AGENT_NAME_MAX_LEN",
    "AGENT_PING_INTERVAL_S",
    "AGENT_PING_TIMEOUT_S",
    "AGENT_READY_TIMEOUT_S",
    "API_OFFSET_MAX",
    "BODY_MAX_BYTES",
    "BODY_MAX_ENCODED_CHARS",
    "BOT_BODY_MAX_BYTES",
    "BOT_CANCEL_GRACE_S",
    "CLOSE_REASON_MAX_BYTES",
    "CLOSE_WAIT_S",
    "CONTROL_FRAME_MAX_PAYLOAD_BYTES",
    "DAILY_API_RESPONSE_MAX_BYTES",
    "DAILY_API_TIMEOUT_S",
    "DAILY_ROOM_TOKEN_MAX_CHARS",
    "DAILY_ROOM_URL_MAX_CHARS",
    "DISPATCH_ATTEMPTS",
    "DRAIN_TIMEOUT_S",
    "ENDED_REPLAY_WINDOW_S",
    "FRAME_HEADER_MAX_BYTES",
    "FRAME_SCANNER_PARTIAL_MAX_BYTES",
    "ICE_CONFIG_FETCH_TIMEOUT_S",
    "ICE_CONFIG_MAX_BYTES",
    "IDLE_REAP_S",
    "KEEPALIVE_IDLE_TIMEOUT_S",
    "LIFECYCLE_STREAM_MAXLEN",
    "LEASE_END_TIMEOUT_S",
    "LINGERING_CLOSE_MAX_BYTES",
    "LINGERING_CLOSE_S",
    "LOGS_LIMIT_DEFAULT",
    "LOGS_LIMIT_MAX",
    "LOGS_PAGE_MAX_BYTES",
    "LOGS_RECENT_SESSIONS_MAX",
    "LOGSHIP_BATCH_MAX_BYTES",
    "LOGSHIP_POLL_INTERVAL_S",
    "LOGSHIP_RECORD_MAX_BYTES",
    "LOGSHIP_RETENTION_S",
    "LOGSHIP_SESSIONS_PER_AGENT_MAX",
    "LOGSHIP_STREAM_MAXLEN",
    "LOG_LINE_MAX_CHARS",
    "LOG_MAX_TOTAL_MB_DEFAULT",
    "LOG_PRUNE_INTERVAL_S",
    "LOG_RETENTION_DAYS_DEFAULT",
    "MAX_AGENTS_DEFAULT",
    "MAX_CONNECTIONS_DEFAULT",
    "MAX_SESSION_DURATION_DEFAULT_S",
    "MAX_SESSION_DURATION_MAX_S",
    "MAX_SESSION_DURATION_MIN_S",
    "METRICS_MAX_CONNECTIONS",
    "MIN_AGENTS_DEFAULT",
    "ORG_NAME_MAX_LEN",
    "OTHER_LIMITS",
    "PEER_INPUT_LIMITS",
    "PROVIDER_HANDSHAKE_TIMEOUT_S",
    "PROVIDER_OPENING_FRAME_MAX_BYTES",
    "PROVIDER_OPENING_MAX_BYTES",
    "PROVIDER_OPENING_MAX_FRAMES",
    "READINESS_CHECK_TIMEOUT_S",
    "RECORD_ERROR_MAX_CHARS",
    "REDIS_CONNECTION_RETRIES",
    "REDIS_RETRY_BACKOFF_MAX_S",
    "REDIS_SOCKET_TIMEOUT_S",
    "REFUSAL_LOG_LINES_PER_S",
    "RELAY_HIGH_WATER_BYTES",
    "RELAY_LOW_WATER_BYTES",
    "REPLAY_BUSY_TIMEOUT_S",
    "REPLAY_MAINTENANCE_INTERVAL_S",
    "RESOURCE_SAMPLES_MAX",
    "RESOURCE_SAMPLE_INTERVAL_S",
    "REQUEST_BODY_TIMEOUT_S",
    "REQUEST_HEADER_LINES_MAX",
    "REQUEST_HEADER_LINE_MAX_BYTES",
    "REQUEST_HEAD_MAX_BYTES",
    "REQUEST_HEAD_TIMEOUT_S",
    "REQUEST_URL_MAX_BYTES",
    "RETRY_AFTER_AT_CAPACITY_S",
    "RETRY_AFTER_NOT_READY_S",
    "SECRET_NAME_MAX_LEN",
    "SECRET_SETS_PER_ORG_MAX",
    "SECRET_SET_MAX_BYTES",
    "SECRET_VALUE_MAX_BYTES",
    "SECRETS_PER_REQUEST_MAX",
    "SECRETS_REQUEST_MAX_BYTES",
    "SERVICE_HOST_MAX_LEN",
    "SESSION_PROXY_BODY_MAX_BYTES",
    "SESSION_PROXY_START_WAIT_S",
    "SESSION_PROXY_TIMEOUT_S",
    "SESSION_STARTS_BURST_DEFAULT",
    "SESSION_STARTS_PER_SOURCE_DEFAULT",
    "SESSION_START_SOURCES_MAX",
    "SLOW_PEER_TIMEOUT_S",
    "STOP_POLL_INTERVAL_S",
    "STOP_WAIT_S",
    "START_REQUEST_MAX_BYTES",
    "TCP_KEEPALIVE_COUNT",
    "TCP_KEEPALIVE_IDLE_S",
    "TCP_KEEPALIVE_INTERVAL_S",
    "TLS_CERT_POLL_INTERVAL_S",
    "TLS_HANDSHAKE_TIMEOUT_S",
    "TOKEN_CLOCK_SKEW_S",
    "TOKEN_TTL_S",
    "UPSTREAM_HANDSHAKE_TIMEOUT_S",
    "UPSTREAM_RESPONSE_HEAD_MAX_BYTES",
    "WEBRTC_CANDIDATES_MAX",
    "WEBRTC_OFFERS_MAX",
    "WEBRTC_OFFER_MAX_BYTES",
    "WEBRTC_OFFER_TIMEOUT_S",
    "WEBRTC_PATCH_MAX_BYTES",
    "WS_MAX_SIZE_BYTES",
    "WS_PER_MESSAGE_DEFLATE",
    "WS_PING_INTERVAL_S",
    "WS_PING_TIMEOUT_S",
]

# --- Names ---------------------------------------------------------------------------------

#: PCC's ``CreateServiceRequest.serviceName``: ``^[a-z0-9]([-a-z0-9]*[a-z0-9])$``, at most 54.
AGENT_NAME_MAX_LEN = 54
#: Organisation names are DNS-label-like (``three-random-words-12345``); 63 is a DNS label.
ORG_NAME_MAX_LEN = 63
#: A service host is ``{agent}.{org}``: 54 + 1 + 63 = 118 fits; anything over 200 is refused
#: outright before any parsing (the lifecycle issue names 200 as the hard bound).
SERVICE_HOST_MAX_LEN = 200

# --- Body (?body=) ---------------------------------------------------------------------------

#: PCC: "4 KB of JSON" for WebSocket sessions because the body rides in the upgrade URL.
#: catflap reads it as 4096 bytes of *decoded* UTF-8 JSON (spec decision table).
BODY_MAX_BYTES = 4096
#: The longest raw ``?body=`` value worth decoding: padded base64 of 4096 bytes is 5464
#: characters, and percent-encoding can triple that. Longer values are refused with 413
#: without decoding them.
BODY_MAX_ENCODED_CHARS = 5464 * 3
#: A ``POST /bot`` body (the session's ``body`` JSON, sessions without a WebSocket): PCC's cap
#: for its Daily and WebRTC sessions is "1 MB", whose body rides in a request body rather than
#: the upgrade URL. Larger bodies get 413 ``body_too_large``.
BOT_BODY_MAX_BYTES = 1_000_000

# --- HTTP request heads (gateway) ----------------------------------------------------------

#: Longest request target. A worst-case percent-encoded 4 KiB body (16,392 chars) plus a token
#: and service host must fit; nginx's default ``large_client_header_buffers`` is 4 x 8 KiB.
#: Longer targets get 414.
REQUEST_URL_MAX_BYTES = 20 * 1024
#: Whole request head (request line + headers). h11 uses 16 KiB and nginx 32 KiB; we need the
#: long URL above plus ordinary headers. Larger heads get 431.
REQUEST_HEAD_MAX_BYTES = 32 * 1024
#: A client must finish sending its request head within this time (slow-loris bound).
REQUEST_HEAD_TIMEOUT_S = 10.0
#: At most this many header lines per request head: websockets' ``MAX_NUM_HEADERS``, which the
#: agent runtime's handshake parser enforces too, so the gateway refuses (431) what the agent
#: would choke on instead of forwarding it. Applies to every request on a connection.
REQUEST_HEADER_LINES_MAX = 128
#: The longest single header line (name, ": ", value, CRLF): websockets' ``MAX_LINE_LENGTH``
#: (it counts the CRLF) and nginx's
#: ``large_client_header_buffers`` buffer size (8 KiB). Longer lines get 431.
REQUEST_HEADER_LINE_MAX_BYTES = 8 * 1024
#: A request body (the control API's JSON) must be complete this long after its head; nginx's
#: ``client_body_timeout`` is 60 s between reads, we bound the whole body, which is at most
#: ``START_REQUEST_MAX_BYTES``. Past it: 408 and close.
REQUEST_BODY_TIMEOUT_S = 10.0
#: An idle kept-alive connection (no byte of a next request) is closed after this long:
#: uvicorn's ``timeout_keep_alive`` default; nginx's ``keepalive_timeout`` is 75 s.
KEEPALIVE_IDLE_TIMEOUT_S = 5.0
#: Open client connections one gateway holds at most (``[gateway] max_connections``); past it
#: new connections get 503 at once, and idle ones with no complete head are closed first. Two
#: fds per relayed session, well inside a raised ``RLIMIT_NOFILE``.
MAX_CONNECTIONS_DEFAULT = 16384
#: The /start request: a small JSON document around the session's ``body``, which for a session
#: without a WebSocket may be ``BOT_BODY_MAX_BYTES`` (PCC's 1 MB) on its own; 64 KiB is room for
#: the other fields (``dailyRoomProperties`` and the like). Anything larger is refused with 413.
START_REQUEST_MAX_BYTES = BOT_BODY_MAX_BYTES + 64 * 1024
#: New sessions one client address may start per second (``[gateway]
#: session_starts_per_source``; 0 turns the bound off), a token bucket per source as nginx's
#: ``limit_req``. Each start costs an agent instance CPU (3.6 ms each, measured by
#: bench/attackers.py ``close-declares-16MiB``) and, in production, LLM and TTS money: that
#: attack's 88 starts a second from one address made other sessions' p99 latency 5x worse on
#: a 2-core host. A person starts a call every few seconds at most; a telephony provider or a
#: proxy, which funnel many callers through one address, are what ``session_starts_exempt``
#: is for. Past it: 429 ``too_many_starts`` with ``Retry-After``, before any token is spent or
#: slot reserved.
SESSION_STARTS_PER_SOURCE_DEFAULT = 20.0
#: ...and this many at once above that rate (``[gateway] session_starts_burst``): a load test
#: or a page that opens a few sessions together is not refused. nginx's ``burst`` is the same
#: idea; 100 is five seconds' worth of the rate.
SESSION_STARTS_BURST_DEFAULT = 100
#: Sources (an IPv4 address, or an IPv6 /64) whose buckets are kept; past it the least
#: recently seen is forgotten, so an attacker with many addresses cannot grow the table. About
#: 210 bytes a source (tracemalloc), so 3.3 MiB at most; nginx's ``limit_req_zone`` holds about
#: 16,000 states per MiB of zone and likewise drops the least recently used one when full. A
#: forgotten source starts again with a full burst, which is the cost of the bound.
SESSION_START_SOURCES_MAX = 16384
#: Open connections the separate ``/metrics`` listener (``[gateway] metrics_listen``) holds at
#: most. A Prometheus server keeps one scrape per target in flight, so a few scrapers and a
#: curl fit with room to spare; past it new connections get 503 at once, so that listener
#: cannot use up the gateway's file descriptors. Each connection carries one request.
METRICS_MAX_CONNECTIONS = 32

# --- Daily's REST API (rooms for `createDailyRoom`) ------------------------------------------

#: One call to Daily's REST API (``POST /rooms``, ``POST /meeting-tokens``) must be answered,
#: body and all, within this time; past it ``/start`` answers 504 ``daily_api_timeout`` and no
#: bot starts. Daily answers in well under a second; pipecat's own helper sets no bound at all.
DAILY_API_TIMEOUT_S = 10.0
#: The most of one Daily API answer catflap reads. A room object with its ``config`` is about
#: 1 KiB and a token answer a few hundred bytes; past this it is not Daily: 502
#: ``daily_api_error``, counted as it arrives.
DAILY_API_RESPONSE_MAX_BYTES = 64 * 1024
#: Daily's room ``url`` and meeting ``token`` travel to the runtime in request headers
#: (``x-daily-room-url``, ``x-daily-room-token``), so they must fit a header line
#: (``REQUEST_HEADER_LINE_MAX_BYTES``) with room to spare: a room URL is under 100 characters,
#: a meeting token (a JWT) a few hundred. Longer: 502 ``daily_api_error``.
DAILY_ROOM_URL_MAX_CHARS = 2048
DAILY_ROOM_TOKEN_MAX_CHARS = 4096
#: A TLS client (``listen_tls``) must complete its handshake within this time after it connects,
#: sending its first byte included; else the connection is closed without a word. nginx's
#: ``ssl_handshake_timeout`` is 60 s and asyncio's default 60 s too, which lets a connect flood
#: hold a slot of ``max_connections`` per socket for a minute. A real handshake over a
#: transatlantic path is 2 round trips (TLS 1.3) to 3 (1.2) plus a few ms of signing: well under
#: a second even on a lossy mobile link; 10 s is the same bound as the request head's
#: (``REQUEST_HEAD_TIMEOUT_S``), which starts once the handshake is done.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: How often the gateway looks at ``tls_cert`` and ``tls_key`` (size, mtime, inode) to reload a
#: renewed certificate without a SIGHUP. A stat of two files every few seconds costs nothing; an
#: ACME client renews weeks before expiry, so seconds of delay never matter.
TLS_CERT_POLL_INTERVAL_S = 5.0

# --- Tokens ----------------------------------------------------------------------------------

#: PCC: "5 minutes from when it is generated".
TOKEN_TTL_S = 300
#: Clocks of several gateways may disagree slightly; ``iat`` this far in the future is still
#: accepted, and ``exp`` is enforced exactly (a token is never valid past its ``exp``).
TOKEN_CLOCK_SKEW_S = 5
#: ``catflap serve`` keeps spent jtis in SQLite: this often a worker thread deletes expired ones
#: and checkpoints the WAL (the fsync, kept off the event loop). About 5 KiB of WAL per spent
#: token, so a second's worth stays small even at hundreds of sessions per second.
REPLAY_MAINTENANCE_INTERVAL_S = 1.0
#: A spend that finds the SQLite file locked (the pruner, or another gateway sharing the state
#: dir, writing at that moment) waits this long on the worker thread before 503. Each writer
#: holds the lock for microseconds; seconds means the disk is in trouble.
REPLAY_BUSY_TIMEOUT_S = 2.0

# --- Capacity and pool -----------------------------------------------------------------------

#: PCC defaults for ``[scaling]``: scale to zero, hard cap 50.
MIN_AGENTS_DEFAULT = 0
MAX_AGENTS_DEFAULT = 50
#: PCC keeps an idle instance warm for 5 minutes after its session.
IDLE_REAP_S = 300.0
#: The pool pings every runtime this often over its control channel...
AGENT_PING_INTERVAL_S = 5.0
#: ...and kills and replaces one that has not answered for this long (a hung event loop:
#: a bot blocking it stalls every session's audio anyway). uvicorn's supervisor does the same.
AGENT_PING_TIMEOUT_S = 20.0
#: A bot that ignores cancellation this long has its process killed and replaced, so that an
#: instance is never reused while a bot may still be running in it.
BOT_CANCEL_GRACE_S = 5.0
#: ``DELETE .../sessions/{id}`` answers once ``bot()`` has ended, waiting at most this long,
#: then 202 ``stopping``. A bot that lets cancellation through ends within milliseconds; one
#: that swallows it is killed after ``BOT_CANCEL_GRACE_S``. Shorter than that grace, and than
#: the live view's 5 s request limit (``catflap sessions stop`` allows 10 s), so that the
#: caller hears back promptly even then; the record says how the session ended.
STOP_WAIT_S = 3.0
#: While it waits, the stop reads the session's record this often: from memory when this
#: gateway relays the session (free), else one read of the shared store (Redis or PostgreSQL),
#: so at most 60 reads per stop.
STOP_POLL_INTERVAL_S = 0.05
#: How long a handshake may wait for a cold-starting instance before 503. A real Pipecat import
#: takes about 1 s here; PCC's cold start is 10 s at best.
AGENT_READY_TIMEOUT_S = 30.0
#: ``Retry-After`` on 429: capacity frees when any session ends, so retrying soon is sensible.
RETRY_AFTER_AT_CAPACITY_S = 1
#: ``Retry-After`` on 503 (agent not ready, draining, upstream unreachable). LiveKit uses 1.
RETRY_AFTER_NOT_READY_S = 2
#: ``/readyz`` of a cluster gateway pings Redis (and the records' PostgreSQL) within this bound:
#: under the Kubernetes probe's 2 s ``timeoutSeconds``, and a Redis that takes longer than this
#: to answer a PING cannot dispatch a session in time either.
READINESS_CHECK_TIMEOUT_S = 1.0

# --- Sessions ----------------------------------------------------------------------------------

#: PCC ``max_session_duration``: default 2 h, range 60 s to 4 h.
MAX_SESSION_DURATION_DEFAULT_S = 7200
MAX_SESSION_DURATION_MIN_S = 60
MAX_SESSION_DURATION_MAX_S = 14400
#: A bot's error text kept in a session record (and shown by the API and dashboard); longer
#: texts are cut and marked, so one bot raising a 500 KB message cannot bloat every poll.
RECORD_ERROR_MAX_CHARS = 4096
#: Graceful shutdown lets live sessions run this long (PCC base image ``SHUTDOWN_TIMEOUT``).
DRAIN_TIMEOUT_S = 7200.0

# --- Relay -------------------------------------------------------------------------------------

#: Provider endpoints: the opening messages (``connected``/``start``) must arrive within this
#: time after the upgrade, or the stream is closed with 1008 and no bot is started.
PROVIDER_HANDSHAKE_TIMEOUT_S = 10.0
#: The largest opening message a provider endpoint reads; real ``start`` messages are a few
#: hundred bytes, plus custom parameters (Exotel: 256 characters; Twilio: a few KiB).
PROVIDER_OPENING_FRAME_MAX_BYTES = 64 * 1024
#: Everything a provider may send before its ``start`` message, in bytes and in frames: real
#: openings are one ``connected`` and one ``start`` of a few KiB. Past either: close 1008.
PROVIDER_OPENING_MAX_BYTES = 64 * 1024
PROVIDER_OPENING_MAX_FRAMES = 8
#: A handshake tries this many instances when one cannot be reached, then answers 503
#: (LiveKit's agent endpoints use the same bound).
DISPATCH_ATTEMPTS = 3
#: The agent must answer the forwarded upgrade within this time, or the client gets 503.
UPSTREAM_HANDSHAKE_TIMEOUT_S = 10.0

# --- Session proxy (/v1/public/{agent}/sessions/{id}/{path}) ------------------------------------

#: A proxied request's body, read whole before it is forwarded: PCC's proxy carries small
#: requests to a bot's routes (a SmallWebRTC offer is a few KiB of SDP), and 1 MiB is
#: websockets' ``MAX_BODY_SIZE`` and nginx's ``client_max_body_size``. Past it: 413
#: ``request_too_large``, before the bot sees anything.
SESSION_PROXY_BODY_MAX_BYTES = 1024 * 1024
#: A proxied request for a session whose bot is not running yet (its instance is cold-starting,
#: or the upgrade is on its way) waits this long for it, then gets 503 ``session_starting``:
#: the SmallWebRTC client posts its offer right after ``/start``. It equals the upstream
#: handshake bound, which is how long a session may take to reach ``bot()`` once admitted.
SESSION_PROXY_START_WAIT_S = UPSTREAM_HANDSHAKE_TIMEOUT_S
#: The bot has this long to be reached and send its response head, and at most this long between
#: two reads of its body; past it: 504 ``session_proxy_timeout`` (or, once the head was sent,
#: the response is cut off). Half of nginx's default ``proxy_read_timeout`` (60 s): a bot's
#: route answers in milliseconds, an SDP answer with ICE gathering in a few seconds.
SESSION_PROXY_TIMEOUT_S = 30.0
# --- SmallWebRTC sessions (/start transport "webrtc", the runtime's /api/offer) ----------------

#: A ``POST /bot`` WebRTC session waits this long for the client's first offer, then ends as
#: ``agent_start_timeout``: PCC's base image waits the same (``SmallWebRTCSessionManager(
#: timeout_seconds=120)``).
WEBRTC_OFFER_TIMEOUT_S = 120.0
#: An offer (``POST /api/offer``): its SDP is a few KiB (Chrome's, audio and video, ~6 KiB) and
#: its ``requestData`` a session body; the session proxy carries no more than this anyway.
#: Past it: 413 ``request_too_large``, counted as it arrives.
WEBRTC_OFFER_MAX_BYTES = SESSION_PROXY_BODY_MAX_BYTES
#: A trickle-ICE ``PATCH /api/offer``: the JS client sends what it gathered in 200 ms, a few
#: candidates of ~150 bytes each. Past it: 413 ``request_too_large``.
WEBRTC_PATCH_MAX_BYTES = 64 * 1024
#: Remote ICE candidates one session accepts in all (browsers gather a dozen or two); each
#: one is a pair aioice checks, so more would be CPU a client makes the bot spend. Past it:
#: 413 ``request_too_large``.
WEBRTC_CANDIDATES_MAX = 256
#: Offers one session accepts in all (the first and its renegotiations / ICE restarts); each
#: is an SDP negotiation in the bot's process. Past it: 400 ``webrtc_offer_conflict``.
WEBRTC_OFFERS_MAX = 32
#: ``ICE_CONFIG_URL`` (PCC's way to give the runtime its ICE servers): fetched at each offer,
#: within this time and size; PCC's base image allows 60 s, but the offer waits for it, and
#: the session proxy gives the offer ``SESSION_PROXY_TIMEOUT_S`` in all.
ICE_CONFIG_FETCH_TIMEOUT_S = 5.0
ICE_CONFIG_MAX_BYTES = 64 * 1024

#: Write-buffer marks per relay leg. Above the high mark the opposite leg stops reading, so a
#: slow reader throttles the sender through TCP instead of growing memory. 64 KiB is asyncio's
#: default and about 4 s of 8 kHz PCM16: enough to ride out jitter, small enough to bound RAM.
RELAY_HIGH_WATER_BYTES = 64 * 1024
RELAY_LOW_WATER_BYTES = 16 * 1024
#: A side whose write buffer stays above the high-water mark this long is not reading at all
#: (a stalled or malicious peer): the session is closed with 1013. At 8 kHz PCM16 the buffer
#: alone already holds 4 s of audio, so a live client never comes near this.
SLOW_PEER_TIMEOUT_S = 10.0
#: TCP keepalive on client sockets, so a peer that vanished without a FIN or RST (half-open
#: TCP) is noticed in about idle + interval x count = 35 s even if nothing is being sent.
TCP_KEEPALIVE_IDLE_S = 20
TCP_KEEPALIVE_INTERVAL_S = 5
TCP_KEEPALIVE_COUNT = 3
#: RFC 6455 section 5.5: a control frame (close, ping, pong) carries at most 125 bytes and is
#: never fragmented. One declaring more is a protocol error: close 1002 to its sender.
CONTROL_FRAME_MAX_PAYLOAD_BYTES = 125
#: The longest frame header: 2 + 8 (64-bit length) + 4 (mask).
FRAME_HEADER_MAX_BYTES = 14
#: The most a frame scanner holds between chunks: an incomplete header, or a whole close frame
#: being gathered (its code and reason go to the record).
FRAME_SCANNER_PARTIAL_MAX_BYTES = FRAME_HEADER_MAX_BYTES + CONTROL_FRAME_MAX_PAYLOAD_BYTES
#: The agent's 101 response head is a few hundred bytes; anything past this is not an agent.
UPSTREAM_RESPONSE_HEAD_MAX_BYTES = 16 * 1024
#: Past a session's ``max_session_duration``, how long the runtime may take to report that
#: ``bot()`` ended: its time limit cancels the bot, which has ``BOT_CANCEL_GRACE_S``, plus one
#: missed ping. Past it the slot's instance is replaced (it may still run a bot) and the
#: record says so. (A bot may run on after its connection closes, for post-call work.)
LEASE_END_TIMEOUT_S = BOT_CANCEL_GRACE_S + AGENT_PING_TIMEOUT_S
#: After refusing a peer (an HTTP error, a close frame), the gateway shuts its write side and
#: drops what the peer still sends for at most this long before closing: closing with unread
#: input sends a reset that can destroy the answer (nginx ``lingering_close``; its
#: ``lingering_timeout`` is 5 s).
LINGERING_CLOSE_S = 2.0
#: ...and drops at most this many bytes: a peer still sending past it is flooding, not about to
#: read the answer, and reading its flood would cost the gateway CPU that live calls need.
LINGERING_CLOSE_MAX_BYTES = 64 * 1024
#: Refusal log lines per second at most (HTTP refusals, provider handshakes, protocol
#: errors); past it they are counted and the next line says how many were not written. One
#: peer can cause thousands of refusals a second; metrics count every one.
REFUSAL_LOG_LINES_PER_S = 20
#: A close reason is at most 123 bytes: a control frame's payload is 125, 2 of them the code.
CLOSE_REASON_MAX_BYTES = 123

# --- Agent runtime (uvicorn's WebSocket settings) ---------------------------------------------

#: Audio does not compress, and deflate would cost CPU on every frame of every session; the
#: agent's choice reaches the client, since the gateway relays the negotiation untouched.
WS_PER_MESSAGE_DEFLATE = False
#: uvicorn's defaults: the runtime pings its peer (the client, through the relay) and a dead
#: peer is noticed within 40 s even when no frame flows.
WS_PING_INTERVAL_S = 20.0
WS_PING_TIMEOUT_S = 20.0
#: uvicorn's default; far above any audio frame, and it bounds one message's memory.
WS_MAX_SIZE_BYTES = 16 * 1024 * 1024

#: After one leg closes, how long the other leg's close handshake may take before the socket is
#: torn down. Pipecat cut its own wait to 0.5 s after 10 s stalls hit 19 % of calls.
CLOSE_WAIT_S = 2.0

# --- Logs ------------------------------------------------------------------------------------

#: Session log files older than this are deleted. A week covers "what happened on that call
#: last Tuesday" and keeps a busy host's disk bounded; ``[logs] retention_days`` overrides it.
LOG_RETENTION_DAYS_DEFAULT = 7.0
#: Session log files above this total are deleted oldest first (``[logs] max_total_mb``):
#: about a million lines of a chatty Pipecat bot.
LOG_MAX_TOTAL_MB_DEFAULT = 1024.0
#: How often the pruner enforces both limits; a minute of overshoot is a few MiB at most.
LOG_PRUNE_INTERVAL_S = 60.0
#: A captured line longer than this is cut (a bot printing megabytes without a newline); it also
#: bounds one line of a logs API answer.
LOG_LINE_MAX_CHARS = 64 * 1024
#: Lines one logs API call returns when ``limit`` is not given.
LOGS_LIMIT_DEFAULT = 100
#: Most lines one logs API call returns.
LOGS_LIMIT_MAX = 10_000
#: The largest ``offset`` the sessions and logs APIs accept (past it: 400 ``bad_request``). No
#: page is that far (a gateway's logs hold fewer lines, its store fewer records), and it fits
#: what the offset reaches: SQLite's and PostgreSQL's 64-bit OFFSET, ``itertools.islice``'s
#: ``sys.maxsize``; 30 nines used to reach them and answer 500. Precedent: 2**31 - 1 is Java's
#: ``int``, the type of Elasticsearch's ``from``.
API_OFFSET_MAX = 2**31 - 1
#: A logs API page stops growing past this many bytes of lines (at least one line is always
#: returned): 10,000 lines of up to 64 KiB would otherwise be 640 MiB. ``total`` still counts
#: every line, so a client pages on with ``offset``.
LOGS_PAGE_MAX_BYTES = 4 * 1024 * 1024
#: Without ``sessionId``, the logs API reads this many of the agent's most recent session files.
LOGS_RECENT_SESSIONS_MAX = 20
#: Cluster mode: a session's newest lines kept in its Redis stream (exact ``MAXLEN``). Half
#: of ``LOGS_LIMIT_MAX``: a 10-minute Pipecat call at INFO logs a few hundred to 2,000 lines,
#: so a whole call fits; a chattier session keeps its tail. The agent host's file has them all.
LOGSHIP_STREAM_MAXLEN = 5_000
#: Cluster mode: one record in Redis, in bytes; a longer ``line`` is cut (with a note saying
#: so). A Python traceback fits; with ``LOGSHIP_STREAM_MAXLEN`` it bounds one session's stream
#: at about 50 MiB of Redis memory (measured: 10.5 KB an entry of this size), where the 64 KiB
#: lines of ``LOG_LINE_MAX_CHARS`` would allow 320 MiB.
LOGSHIP_RECORD_MAX_BYTES = 8 * 1024
#: Cluster mode: a session's lines stay in Redis this long after its last line (the stream's
#: TTL, refreshed as lines arrive). A day answers "what did yesterday's call say" from any
#: gateway; the agent host's files keep ``[logs] retention_days``.
LOGSHIP_RETENTION_S = 24 * 3600.0
#: Cluster mode: sessions per agent whose lines Redis keeps; shipping a newer one deletes the
#: oldest one's stream. Bounds Redis's memory whatever the session rate (about 0.7 GB for
#: 1,000 typical sessions of 2,000 lines; docs/scaling.md has the sums).
LOGSHIP_SESSIONS_PER_AGENT_MAX = 1_000
#: Cluster mode: how often an agent host reads its live sessions' files for new lines: the
#: delay a follower (``catflap logs --follow`` polls every 0.5 s) sees, at one small read each.
LOGSHIP_POLL_INTERVAL_S = 0.25
#: Cluster mode: bytes of a file read (and shipped in one Redis call) at a time. Above the
#: largest record the runtime writes (64 Ki characters, JSON-escaped), so a batch always holds
#: a whole line, and small enough that one call never stalls Redis.
LOGSHIP_BATCH_MAX_BYTES = 1024 * 1024
#: How often the runtime samples its process's CPU and memory while a session runs, at first:
#: Pipecat Cloud's ``resourceMetrics`` timeseries is per second too, and a /proc read costs
#: microseconds.
RESOURCE_SAMPLE_INTERVAL_S = 1.0
#: Samples kept per session. When full, every other sample is dropped and the interval doubles,
#: so a 4 h session still spans its whole length in at most this many points: the record, the
#: control line and each sessions API answer stay a few KiB (the CLI's sparkline shows 50).
RESOURCE_SAMPLES_MAX = 120

# --- Secret sets -------------------------------------------------------------------------------

#: PCC's pattern for secret set names and secret names: ``[a-zA-Z0-9_-]``, at most 64
#: characters (its CLI's ``validate_secrets``; the secret set docs).
SECRET_NAME_MAX_LEN = 64
#: One secret's value, in UTF-8 bytes. Room for a PEM key or a service-account JSON (2-3 KB);
#: AWS Secrets Manager and Google Secret Manager stop at 64 KiB per secret, and Linux at
#: 128 KiB per environment string. Larger values get 400 ``secret_too_large``.
SECRET_VALUE_MAX_BYTES = 32 * 1024
#: A whole set (its names plus values), which becomes one instance's environment: it must fit,
#: with the rest of that environment, in the one datagram a fork server receives per instance
#: (``pool/forkserver.py``, below the kernel's default 208 KiB socket buffer). Past it: 400
#: ``secret_too_large``.
SECRET_SET_MAX_BYTES = 64 * 1024
#: Secret sets per organisation, so that the store (one encrypted document per state_dir, or
#: one Redis hash per organisation) stays bounded by 100 x 64 KiB. Past it: 400
#: ``too_many_secret_sets``.
SECRET_SETS_PER_ORG_MAX = 100
#: A ``PUT /v1/organizations/{org}/secrets/{set}`` body: room for a whole set
#: (``SECRET_SET_MAX_BYTES`` of names and values) in PCC's REST shape, JSON-escaped (text that
#: needs escaping grows, ``\uXXXX`` being 6 bytes for 1-3; 4x covers any set of ordinary text).
#: Larger bodies get 413 ``request_too_large`` before they are read.
SECRETS_REQUEST_MAX_BYTES = 4 * SECRET_SET_MAX_BYTES
#: Secrets in one such body's ``secrets`` array: each one is validated and merged, so the count
#: bounds that work (a 256 KiB body of tiny pairs would be ~15,000 of them). A ``.env`` file
#: rarely holds more than a hundred. Past it: 413 ``request_too_large``.
SECRETS_PER_REQUEST_MAX = 1000

# --- Cluster lifecycle streams (Redis Streams) ------------------------------------------------

#: Entries kept in each lifecycle stream (``{prefix}:ended`` and ``{prefix}:stop``), trimmed
#: approximately (``XADD MAXLEN ~``) at every append. A reader that was away (a gateway or host
#: reconnecting to Redis) reads on from its last id, so this bounds the outage it can make up
#: for: 10,000 ends is 1,000 s at 10 sessions ending per second, far beyond the 5 s reconnect
#: backoff. A stop entry is about 100 bytes; an ended entry carries the session's resource
#: time series (``RESOURCE_SAMPLES_MAX`` points) and error text, measured about 6.4 KB and at
#: most about 10 KB, so a full ``ended`` stream is 64-100 MB of Redis memory.
LIFECYCLE_STREAM_MAXLEN = 10_000
#: When an agent host finds that Redis lost its keys (a restart without persistence), it appends
#: the ``ended`` events of the sessions that ended this long ago or less once more: one appended
#: just before the restart may not have reached every gateway. Gateways ignore duplicates. A
#: minute covers the restart, the hosts' reconnect backoff (5 s) and the heartbeat that notices
#: (a third of a TTL).
ENDED_REPLAY_WINDOW_S = 60.0

# --- Cluster Redis connections ------------------------------------------------------------

#: A command to Redis (gateway, agent host, ``catflap secrets --redis``) gets an answer within
#: this, or fails (the caller's outage handling takes over: 503, queue and retry). Connecting
#: has the same bound.
REDIS_SOCKET_TIMEOUT_S = 2.0
#: A command that meets a dead connection is sent again on a new one, this many times. After
#: a Redis restart every pooled connection is dead, and without a retry the first command on
#: each fails (a session record's save was lost so). Only connection errors are retried, where
#: the command did not reach Redis or its answer was lost with the connection; never a
#: timeout, whose command may still run. redis-py's own ``Retry``.
REDIS_CONNECTION_RETRIES = 2
#: The wait before each such retry doubles from 50 ms up to this: a restarting Redis accepts
#: connections again within a second, and a handshake waits at most 2 x 0.1 s more.
REDIS_RETRY_BACKOFF_MAX_S = 0.1

# --- Which limits guard what a peer sends ------------------------------------------------------

#: Limits on what a client, a provider or an agent's wire may make the gateway hold or wait for.
#: Every one is exercised by some test (tests/test_limits.py checks), and listed with its
#: response in docs/security.md.
PEER_INPUT_LIMITS: frozenset[str] = frozenset(
    {
        "AGENT_NAME_MAX_LEN",
        "API_OFFSET_MAX",
        "BODY_MAX_BYTES",
        "BODY_MAX_ENCODED_CHARS",
        "BOT_BODY_MAX_BYTES",
        "CLOSE_WAIT_S",
        "CONTROL_FRAME_MAX_PAYLOAD_BYTES",
        "DAILY_API_RESPONSE_MAX_BYTES",
        "DAILY_API_TIMEOUT_S",
        "DAILY_ROOM_TOKEN_MAX_CHARS",
        "DAILY_ROOM_URL_MAX_CHARS",
        "FRAME_SCANNER_PARTIAL_MAX_BYTES",
        "KEEPALIVE_IDLE_TIMEOUT_S",
        "LINGERING_CLOSE_MAX_BYTES",
        "LINGERING_CLOSE_S",
        "LOGS_LIMIT_MAX",
        "LOGS_PAGE_MAX_BYTES",
        "LOGSHIP_RECORD_MAX_BYTES",
        "LOGSHIP_SESSIONS_PER_AGENT_MAX",
        "LOGSHIP_STREAM_MAXLEN",
        "MAX_CONNECTIONS_DEFAULT",
        "METRICS_MAX_CONNECTIONS",
        "ORG_NAME_MAX_LEN",
        "PROVIDER_HANDSHAKE_TIMEOUT_S",
        "PROVIDER_OPENING_FRAME_MAX_BYTES",
        "PROVIDER_OPENING_MAX_BYTES",
        "PROVIDER_OPENING_MAX_FRAMES",
        "RECORD_ERROR_MAX_CHARS",
        "REFUSAL_LOG_LINES_PER_S",
        "RELAY_HIGH_WATER_BYTES",
        "REQUEST_BODY_TIMEOUT_S",
        "REQUEST_HEADER_LINES_MAX",
        "REQUEST_HEADER_LINE_MAX_BYTES",
        "REQUEST_HEAD_MAX_BYTES",
        "REQUEST_HEAD_TIMEOUT_S",
        "REQUEST_URL_MAX_BYTES",
        "SECRET_NAME_MAX_LEN",
        "SECRET_SETS_PER_ORG_MAX",
        "SECRET_SET_MAX_BYTES",
        "SECRET_VALUE_MAX_BYTES",
        "SECRETS_PER_REQUEST_MAX",
        "SECRETS_REQUEST_MAX_BYTES",
        "SERVICE_HOST_MAX_LEN",
        "SESSION_PROXY_BODY_MAX_BYTES",
        "SESSION_PROXY_START_WAIT_S",
        "SESSION_PROXY_TIMEOUT_S",
        "SESSION_STARTS_BURST_DEFAULT",
        "SESSION_STARTS_PER_SOURCE_DEFAULT",
        "SESSION_START_SOURCES_MAX",
        "SLOW_PEER_TIMEOUT_S",
        "START_REQUEST_MAX_BYTES",
        "TLS_HANDSHAKE_TIMEOUT_S",
        "TOKEN_CLOCK_SKEW_S",
        "TOKEN_TTL_S",
        "UPSTREAM_HANDSHAKE_TIMEOUT_S",
        "UPSTREAM_RESPONSE_HEAD_MAX_BYTES",
        "WEBRTC_CANDIDATES_MAX",
        "WEBRTC_OFFERS_MAX",
        "WEBRTC_OFFER_MAX_BYTES",
        "WEBRTC_OFFER_TIMEOUT_S",
        "WEBRTC_PATCH_MAX_BYTES",
        "WS_MAX_SIZE_BYTES",
    }
)
#: The other limits: defaults, intervals, and bounds on catflap's own processes. A new limit
#: goes in one of the two sets (tests/test_limits.py refuses one in neither).
OTHER_LIMITS: frozenset[str] = frozenset(
    {
        "AGENT_PING_INTERVAL_S",
        "AGENT_PING_TIMEOUT_S",
        "AGENT_READY_TIMEOUT_S",
        "BOT_CANCEL_GRACE_S",
        "CLOSE_REASON_MAX_BYTES",
        "DISPATCH_ATTEMPTS",
        "DRAIN_TIMEOUT_S",
        "ENDED_REPLAY_WINDOW_S",
        "FRAME_HEADER_MAX_BYTES",
        "ICE_CONFIG_FETCH_TIMEOUT_S",
        "ICE_CONFIG_MAX_BYTES",
        "IDLE_REAP_S",
        "LEASE_END_TIMEOUT_S",
        "LIFECYCLE_STREAM_MAXLEN",
        "LOGS_LIMIT_DEFAULT",
        "LOGS_RECENT_SESSIONS_MAX",
        "LOGSHIP_BATCH_MAX_BYTES",
        "LOGSHIP_POLL_INTERVAL_S",
        "LOGSHIP_RETENTION_S",
        "LOG_LINE_MAX_CHARS",
        "LOG_MAX_TOTAL_MB_DEFAULT",
        "LOG_PRUNE_INTERVAL_S",
        "LOG_RETENTION_DAYS_DEFAULT",
        "MAX_AGENTS_DEFAULT",
        "MAX_SESSION_DURATION_DEFAULT_S",
        "MAX_SESSION_DURATION_MAX_S",
        "MAX_SESSION_DURATION_MIN_S",
        "MIN_AGENTS_DEFAULT",
        "RELAY_LOW_WATER_BYTES",
        "REPLAY_BUSY_TIMEOUT_S",
        "REPLAY_MAINTENANCE_INTERVAL_S",
        "RESOURCE_SAMPLES_MAX",
        "RESOURCE_SAMPLE_INTERVAL_S",
        "RETRY_AFTER_AT_CAPACITY_S",
        "RETRY_AFTER_NOT_READY_S",
        "READINESS_CHECK_TIMEOUT_S",
        "REDIS_CONNECTION_RETRIES",
        "REDIS_RETRY_BACKOFF_MAX_S",
        "REDIS_SOCKET_TIMEOUT_S",
        "STOP_POLL_INTERVAL_S",
        "STOP_WAIT_S",
        "TCP_KEEPALIVE_COUNT",
        "TCP_KEEPALIVE_IDLE_S",
        "TCP_KEEPALIVE_INTERVAL_S",
        "TLS_CERT_POLL_INTERVAL_S",
        "WS_PER_MESSAGE_DEFLATE",
        "WS_PING_INTERVAL_S",
        "WS_PING_TIMEOUT_S",
    }
)
