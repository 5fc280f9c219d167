"""Thin HTTP routers, one per resource: parse, authorise, call the serving object."""
