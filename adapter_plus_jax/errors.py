"""The error for bad input that is found before any compute."""


class SetupError(ValueError):
    """Bad input found before any compute; the message says what to do."""
