"""The converter's one error type."""


class ConversionError(ValueError):
    """The model or checkpoint cannot be converted; the message is one line and names the fix."""
