"""Executors: where notebook functions run (threads, and an asyncio loop for coroutines)."""
