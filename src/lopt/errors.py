"""Errors caused by the user's input (files, rows, flags, models). The CLI prints them as one line."""


class UserError(ValueError):
    """Bad input; the message names the offending value and the fix."""


class DataError(UserError):
    """A data file, dataset or row that lopt cannot use."""
