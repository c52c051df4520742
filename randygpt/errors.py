"""The one exception type for mistakes a user can fix: the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input (flags, data, files). The message says what is wrong and what to do."""
