"""Tests that need a CUDA GPU (``pytest -m gpu tests/gpu``); skipped where there is none (CI)."""
