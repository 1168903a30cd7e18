"""`potstill serve`: a local model behind an OpenAI-compatible HTTP API."""

from potstill.serve.app import bind, build_app, serve

__all__ = ["bind", "build_app", "serve"]
