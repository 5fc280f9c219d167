"""Model backends behind one Engine protocol (see base.py)."""

from server.engine.base import Engine, GenerationChunk, GenerationParams, TokenLogprob

__all__ = ["Engine", "GenerationChunk", "GenerationParams", "TokenLogprob"]
