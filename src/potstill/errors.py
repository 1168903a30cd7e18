"""The one exception type for a user's mistake: the CLI prints its message, not a traceback."""


class PotstillError(Exception):
    """Bad input or an impossible request. The message says what, where, and what to do."""
