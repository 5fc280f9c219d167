"""Tool packs: each subpackage is one pack of @tool functions (see tools/README.md)."""
