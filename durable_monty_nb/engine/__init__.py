"""The engine: runs workflow code durably (no IPython needed)."""
