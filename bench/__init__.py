"""catflap's benchmark suite: catflap's gateway side by side with nginx and a direct connection.

Run ``python -m bench --help`` (or ``catflap bench --help``); ``docs/benchmarks.md`` explains the
scenarios and every number. Modules: :mod:`bench.loadgen` (the load client),
:mod:`bench.contestants` (upstream, nginx, catflap), :mod:`bench.scenarios`,
:mod:`bench.report` (JSON, Markdown, PNG) and :mod:`bench.procs` (pinning, /proc readers).
"""
