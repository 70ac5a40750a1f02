"""The OpenAI-compatible HTTP server: `microscale serve MODEL`."""
