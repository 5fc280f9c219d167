"""Enclave: a self-hosted, OpenAI-compatible assistant server."""

__version__ = "0.1.0"
