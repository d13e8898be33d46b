"""The Pipecat Cloud contract as catflap implements it: one source of truth.

Every number, header name, close code, error status and parsing rule of the public contract
lives in this package, so the gateway, the control API and the agent runtime cannot drift apart.

- :mod:`~catflap.contract.limits`: every limit, with the reason for its value.
- :mod:`~catflap.contract.headers`: header and query-parameter names on both hops.
- :mod:`~catflap.contract.closecodes`: the WebSocket close codes catflap may send.
- :mod:`~catflap.contract.errors`: the typed errors and the HTTP status each one maps to.
- :mod:`~catflap.contract.names`: agent, organisation and service-host syntax.
- :mod:`~catflap.contract.body`: decoding and normalising ``?body=``.
"""
