"""The job scripts of this checkout (not part of the usp_attn package).

A package so that the benchmark suite can import the built-in model as ``launch.tiny_dit`` and
``launch.flow_match`` (both import nothing from their siblings) from the repository root. The scripts
themselves still run as ``python launch/generate.py`` and import their siblings by plain name.
"""
