"""Errors meant for people: the CLI prints them as one line, without a traceback."""


class LoraplaceError(Exception):
    """A problem with the user's input or environment. The message says what was wrong,
    what was expected, and what to do next."""
