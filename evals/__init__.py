"""Offline evals: golden datasets (datasets/*.jsonl), the knowledge they are grounded in
(knowledge/), the runner behind `enclave eval`, its scorers and its report."""
