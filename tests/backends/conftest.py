"""Fixtures for the backend tests."""

from fake_backend import fake_backend  # noqa: F401  (re-exported as a fixture)
