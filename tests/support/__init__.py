"""Shared test helpers: fakes, process spawners, tiny models."""
