"""Scale-out on one Redis: many gateways, many agent hosts.

Theory of operation:

- An **agent host** (``catflap agent-host``) runs a local pool of one agent's instances and
  registers each ready instance in Redis: a hash with its address and capacity whose TTL a
  heartbeat keeps refreshing. An instance whose heartbeat lapses disappears from dispatch within
  one TTL.
- A **gateway** (``catflap gateway``) reserves a slot with one Lua script
  (:data:`~catflap.cluster.dispatch.DISPATCH_LUA`), so two gateways can never take the same
  slot, and draws the instance at random weighted by its free slots, so bursts spread over
  hosts. The reservation lives until the runtime reports ``session_started`` (the host then
  moves it to the instance's active set) or expires.
- A session that finds no free slot joins the agent's waiting set; agent hosts with room start
  instances while waiting sessions outnumber starting ones (``CLAIM_LUA``, atomic), and the
  session dispatches again when one registers (the ``ready`` channel), up to
  ``agent_ready_timeout``. Past ``max_agents``: 429.
- When ``bot()`` ends, the host frees the slot and appends the outcome to the ``ended``
  stream; the gateway that relays the session reads it and finishes the record.
- Tokens are single use across gateways (``SET jti NX PXAT exp``); stop requests travel on
  the ``stop`` stream to whichever host holds the session. Every reader of a stream reads on
  from its last id after a reconnect (:mod:`catflap.cluster.streams`), so no event is lost.
- Gateways heartbeat in Redis too and list the sessions they relay: when one dies, a survivor
  finishes its open records (``gateway_lost``), leaving those its hosts still run to the hosts'
  reports (:mod:`catflap.cluster.liveness`).
- Frames never pass through Redis: the media path is gateway -> instance over TCP.

Every key name and TTL is in :mod:`catflap.cluster.keys`.
"""
