"""The one exception type users see: a one-line message naming the bad key and the valid choices."""


from typing import Any


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


def shown(value: Any) -> str:
    """A value as the user wrote it on the command line (lists in brackets, true/false/null)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)
