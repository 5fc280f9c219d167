"""Every id the server mints, in one place, with the prefixes clients already know.

Object ids are a prefix and 24 random hex digits (96 bits), as OpenAI's look; a chat
completion's keeps its `chatcmpl-` and 32 hex digits, a file's its `file-`. Internal
request ids (engine calls of rails, summaries, precompiles) only need to be unique.
"""

from __future__ import annotations

import secrets
import uuid

# Objects clients see, by the prefix OpenAI (or our own API) gives them.
PREFIXES = {
    "response": "resp_",
    "message": "msg_",
    "function_call": "fc_",
    "function_call_output": "fco_",
    "file_search_call": "fs_",
    "tool_call": "call_",
    "conversation": "conv_",
    "memory": "mem_",
    "action": "act_",
    "vector_store": "vs_",
    "file": "file-",
    "cached_response": "rc_",
    "mcp_list_tools": "mcpl_",
    "mcp_approval_response": "mcpr_",
    "workflow_run": "wfr_",
    "batch": "batch_",
    "batch_request": "batch_req_",
}


def new_id(kind: str) -> str:
    return PREFIXES[kind] + secrets.token_hex(12)


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def internal_id(what: str, short: bool = False) -> str:
    """A request id for the engine or a worker: `what` and a random suffix."""
    return f"{what}-{secrets.token_hex(4 if short else 6)}"
