"""usp_attn's benchmark suite (not part of the package): ``python benchmarks/run.py --help``.

run.py is the one entry point: it runs named parts, each a module named for what it measures,
returning rows in one format (suite.py) that one reporter (report.py) writes as markdown, JSON and
a PNG. kernels.py holds the attention candidates (one entry each), timing.py the timers,
local_ring.py the in-memory ring exchange of the one-GPU ring measurements. See BENCHMARKS.md.
"""
