"""The one exception type kvshare raises for bad input.

Entry points catch it and print its message as a single line with a non-zero
exit (see :mod:`kvshare.cli`); anything else is a bug and keeps its traceback.
"""


class KVShareError(ValueError):
    """Bad input: the message names the bad value and how to fix it."""
