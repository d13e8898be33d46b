"""The gateway: one port that takes each client connection from its first byte to its record.

The modules follow a session's path: ``front`` (read the head) → ``upgrade`` (the pure check) →
``admission`` (token, slot) → ``dispatch``/``upstream`` (the agent's 101) → ``relaying``/``relay``
(bytes both ways, ``relaystate`` its table, ``fastlane`` the native thread) → ``recorder``.
``session`` and ``telephony`` orchestrate those steps; ``listener`` owns the socket and the
shutdown; ``catflap.compose`` wires it all.
"""
