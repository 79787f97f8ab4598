"""usp_attn's tests. A package so that ``tests.helpers`` imports the same way everywhere
(pytest, spawned ranks) and the repository root is on ``sys.path``."""
