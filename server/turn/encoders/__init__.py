"""One encoder per API over the same turn events: chat completions and Responses."""
