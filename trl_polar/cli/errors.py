"""The one error type of the command line."""


class CLIError(Exception):
    """An error meant for the user: printed as one line, exit code 1."""
