"""The localhost OpenAI-compatible HTTP API over the engine."""
