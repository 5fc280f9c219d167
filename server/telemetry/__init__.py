"""Metrics now; tracing, cost and redaction join here as the pipeline grows."""
