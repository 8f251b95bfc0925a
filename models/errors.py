class XQError(Exception):
    """A problem the user can act on. The CLI prints its message as one line, without a traceback."""
