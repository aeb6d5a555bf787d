"""The one exception type the command line turns into a clean one-line error."""


class UEBenchError(ValueError):
    """A user-facing error: bad name, bad value, missing file, violated budget."""
