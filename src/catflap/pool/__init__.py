"""The warm pool: agent instances (runtime processes) kept ready, and one slot per session.

``pool`` is the interface the gateway uses; ``slots`` decides where a session goes (or 429/503);
``supervisor`` launches, pings, backs off and reaps; ``instance`` is one process and its state
table; ``launcher`` and ``forkserver`` start processes.
"""
