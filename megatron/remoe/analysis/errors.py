"""The analysis' one error type."""


class AnalysisError(ValueError):
    """A problem with the inputs (checkpoint, data, output folder); the message is one line."""
