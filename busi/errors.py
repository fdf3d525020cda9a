"""The one exception type users see: its message is printed as a single line by the CLI."""


class BusiError(Exception):
    """A problem with the user's input (a file, a folder, a config) that we can explain in one line."""
