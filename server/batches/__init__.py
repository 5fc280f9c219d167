"""The Batch API: `/v1/batches` over an uploaded JSONL file, run by a low-priority worker."""
