"""The agent runtime: the process that runs one agent's ``bot.py``, as PCC's base image does.

Theory of operation
-------------------

The pool starts one runtime process per agent instance::

    catflap agent --bot-dir DIR --listen unix:/run/a.sock --control-fd N [--agent-name NAME]
                  [--log-dir DIR] [--log-format json|text]

1. **Start.** :mod:`~catflap.runtime.botloader` puts ``DIR`` first on ``sys.path``, changes into
   it and imports ``bot.py`` as the module ``bot``; it must define ``async def bot(args)``. A
   failure sends ``start_failed`` (with the traceback) and exits with code 3. The runtime then
   binds the listening socket itself (:mod:`~catflap.runtime.listen`; ``tcp:HOST:0`` picks a
   free port), serves the FastAPI app of :mod:`~catflap.runtime.app` with uvicorn (the app is
   ``pipecatcloud_system.app``, which exists before ``bot.py`` is imported, so the routes a PCC bot
   adds to it are served after the runtime's own; a bot route on a reserved path is a
   ``start_failed``), and sends
   ``ready`` with the real address once uvicorn is listening (:mod:`~catflap.runtime.process`;
   the flags are parsed by :mod:`~catflap.runtime.main`, exit codes in
   :mod:`~catflap.runtime.exits`).

2. **Sessions.** Each connection to ``WS /ws`` is one session (several may run at once). The
   handler reads the session id (``x-daily-session-id``), ``?body=`` (base64 JSON; undecodable
   means ``None``), the transport type and the session budget from the upgrade request, accepts,
   and awaits ``bot(args)`` as a task registered by session id
   (:mod:`~catflap.runtime.session`, :mod:`~catflap.runtime.running`). ``args`` is the most specific
   installed session-arguments class (:mod:`~catflap.runtime.args`). Each ``POST /bot`` request is
   a session too, one without a WebSocket (:mod:`~catflap.runtime.botroute`): its JSON body, the
   same id and budget headers and, optionally, a Daily room; the request is answered
   ``{"sessionId", "status"}`` once the session has ended. The session ends when:

   ========================  ============  ==============================================
   what happened             status        close sent to the client (if still open)
   ========================  ============  ==============================================
   ``bot()`` returned        completed     1000
   ``bot()`` raised          bot_error     1011, reason = exception class name
   the budget ran out        time_limit    1000 "session time limit reached" (bot cancelled)
   ``stop_session`` command  stopped       1000 "session stopped" (bot cancelled)
   no WebRTC offer in 120 s  agent_start_  (a ``/bot`` WebRTC session; ``bot()`` never ran)
                             timeout
   ========================  ============  ==============================================

   (A ``/bot`` session sends no close: the status is in its answer.) ``session_started`` and
   ``session_ended`` (status, error, whether the client had gone, seconds in ``bot()``) go to the
   pool. A bot that ignores cancellation for 5 s is reported anyway with
   ``error="bot ignored cancellation"``; the pool then kills the process.

3. **Control.** :mod:`~catflap.contract.control` carries line-delimited JSON over the
   ``socketpair()`` end given as ``--control-fd``, and :mod:`~catflap.runtime.control_loop`
   applies each command (a malformed one is logged and skipped): ``ping``/``pong``,
   ``stop_session`` and ``shutdown`` (stop accepting, let sessions finish, exit 0). End of
   file means the pool died: every session is cancelled and the process exits, so no runtime
   outlives its pool. Without ``--control-fd`` the runtime runs standalone and prints its
   address.

4. **Observability.** ``GET /metrics`` (:mod:`~catflap.runtime.metrics`) counts sessions by
   how they ended. The ``/ws`` handler binds the session to its task (a ``ContextVar``), so
   every log line of the runtime and of the bot names it; with ``--log-dir``,
   :mod:`~catflap.runtime.botlogs` writes each session's output to its own ``.jsonl`` file.

5. **Signals.** SIGTERM/SIGINT get uvicorn's graceful shutdown (WebSockets are closed with 1012,
   handlers get up to ``DRAIN_TIMEOUT_S``); uvicorn then re-raises the signal.

Like PCC, the runtime never sets ``ENV=local`` and always passes ``handle_sigint=False``.
"""
