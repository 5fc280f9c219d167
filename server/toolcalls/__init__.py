"""Tool calling: request tools and choices (spec), the output constraint, the prompt
format and call parser, the registry of server-side tools, and their executor."""
