"""The error raised when raw input is structurally wrong."""


class RawDataError(ValueError):
    """The raw input is structurally wrong; the message names the file (and column / row)."""
