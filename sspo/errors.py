"""Errors a user can cause. The CLI prints their message and exits non-zero, without a traceback."""


class SSPOError(Exception):
    """A problem with the user's input, configuration or environment."""
