"""The one exception type users see: a one-line message naming the bad key and the valid choices."""


class DasError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""


def choices_error(key: str, value: object, choices: list[str] | tuple[str, ...], what: str = "") -> DasError:
    """`key=value` is not allowed; list what is."""
    detail = f" ({what})" if what else ""
    return DasError(f"{key}={value!s}: not a valid choice{detail}; valid choices: {', '.join(map(str, choices))}")


class ConfigWarning(UserWarning):
    """A config that runs, but not quite as written (e.g. a repeated grid entry); the CLI prints it on one line."""
