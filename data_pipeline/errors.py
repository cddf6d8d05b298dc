"""The one exception type the data pipeline raises for bad input.

`DataError` subclasses `ValueError` so callers that already catch `ValueError` keep working, while the
trainer and the CLIs can catch exactly the problems that come from data (a missing file, a malformed
JSON line, a manifest that does not match its shards) and print the single message line.
"""


class DataError(ValueError):
    """Bad or missing input data; the message is one line naming the file, key or value at fault."""
