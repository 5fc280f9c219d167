"""Memory: conversations (SQL), the context window, episodic memory and knowledge (Chroma)."""
