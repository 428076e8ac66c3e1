"""Errors that describe bad input. The CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, an argument, a config): the message says which and why."""


class AudioError(UserError):
    """An audio file that cannot be read: empty, truncated, corrupt, or not audio."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
