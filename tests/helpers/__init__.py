"""Helpers shared by the test modules (importable as tests.helpers)."""
