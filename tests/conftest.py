"""Shared fixtures: the live server (one per session, real engine) lives in tests/e2e."""
