"""`potstill serve`: a local model behind an OpenAI-compatible HTTP API."""

from potstill.serve.app import ServeSpec, bind, build_app, serve

__all__ = ["ServeSpec", "bind", "build_app", "serve"]
