"""One exception type for every data problem a user can fix (bad input, missing file, mismatch).

Messages are one line that names the bad value and the fix; the CLIs print them and exit 2.
"""


class DataError(ValueError):
    """Bad or missing data; ``str(err)`` is a one-line message naming the fix."""
