"""The one error type a user sees: its message is a single line saying what is wrong and what to do."""


class MsaeError(Exception):
    """A problem the user can fix (bad input, missing file, no network). str() is one line."""
