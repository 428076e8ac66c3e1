"""Errors that describe bad input. The CLI prints them as one line, never as a traceback."""


def printable(text) -> str:
    """`text` safe to print on any terminal: the bytes of a file name that is not valid UTF-8 (kept
    by Python as surrogates) are shown escaped, "bad\\xffname.wav", instead of failing to encode."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class UserError(Exception):
    """Bad input from the user (a file, an argument, a config): the message says which and why."""


class AudioError(UserError):
    """An audio file that cannot be read: empty, truncated, corrupt, or not audio."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def check_range(name: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """UserError naming the option unless low <= value <= high (strict where *_open); NaN and
    infinities always fail."""
    too_low = low is not None and not (value > low if low_open else value >= low)
    too_high = high is not None and not (value < high if high_open else value <= high)
    if too_low or too_high or value != value or value in (float("inf"), float("-inf")):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise UserError(f"{name} {value}: must be {' and '.join(filter(None, (lo, hi))) or 'finite'}")
