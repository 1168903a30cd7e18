"""Synthetic tasks shipped with potstill, each with its prompts generator and answer verifier."""
