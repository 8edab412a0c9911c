"""The one exception type users see: a one-line message naming the bad key and the valid choices."""


class DasError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""


def choices_error(key: str, value: object, choices: list[str] | tuple[str, ...], what: str = "") -> DasError:
    """`key=value` is not allowed; list what is."""
    detail = f" ({what})" if what else ""
    return DasError(f"{key}={value!s}: not a valid choice{detail}; valid choices: {', '.join(map(str, choices))}")


def non_finite(tensors: dict) -> list[str]:
    """The names of the tensors in `tensors` (nested dicts and lists of tensors, e.g. a training state) that
    hold a NaN or an Inf; integer and boolean tensors are always finite."""
    found = []
    for name, value in tensors.items():
        if isinstance(value, dict):
            found += [f"{name}.{inner}" for inner in non_finite(value)]
        elif isinstance(value, (list, tuple)):
            found += [f"{name}.{inner}" for inner in non_finite(dict(enumerate(value)))]
        elif hasattr(value, "is_floating_point") and (value.is_floating_point() or value.is_complex()):
            import torch

            if not bool(torch.isfinite(value).all()):
                found.append(str(name))
    return found


class ConfigWarning(UserWarning):
    """A config that runs, but not quite as written (e.g. a repeated grid entry); the CLI prints it on one line."""
