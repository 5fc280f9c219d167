"""MCP servers as sources of server tools (server/mcp/tools.py), over stdio and streamable
HTTP (server/mcp/connection.py), configured per deployment (`mcp_servers`)."""
