"""The base of every error a user can fix; the CLI prints these as one line, not a traceback."""


class RsdinoError(Exception):
    """Raised with a message that names the thing at fault and what to do about it."""

    exit_code = 1  # what the CLI exits with
