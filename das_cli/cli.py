"""`das-cli`: a thin Hydra entry point over `das_cli.sweep.run`.

Mistakes in the command line end in one line on stderr naming the key and the valid choices,
and exit status 2; a sweep with failed cells exits with status 1.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config as C
from .errors import DasError

MULTIRUN_FLAGS = ("-m", "--multirun")
NON_OVERRIDE_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--version", "--shell-completion", "-sc", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


def fail(message: str) -> None:
    print(f"das-cli: error: {message}", file=sys.stderr)
    sys.exit(2)


def overrides_of(argv: list[str]) -> list[str] | None:
    """The key=value overrides, or None when Hydra is asked for something other than a plain run."""
    if any(a.split("=")[0] in NON_OVERRIDE_FLAGS for a in argv if a.startswith("-")):
        return None
    return [a for a in argv if not a.startswith("-")]


def check_groups(overrides: list[str], multirun: bool) -> None:
    """`model=foo` and friends: name the valid choices (multirun: each comma-separated value)."""
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key not in C.CONFIG_GROUPS:
            continue
        choices = C.group_choices(key)
        for choice in value.split(",") if multirun else [value]:
            if choice not in choices:
                fail(f"{key}={choice}: unknown {key}; valid choices: {', '.join(choices)}")


def preflight(argv: list[str]) -> None:
    """Compose the config once before Hydra does, so composition errors fit on one line."""
    overrides = overrides_of(argv)
    if overrides is None:
        return
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    check_groups(overrides, multirun)
    if multirun:
        return
    try:
        cfg = C.compose([o for o in overrides if not o.startswith(("hydra.", "hydra/"))])
        C.validate(C.typed(cfg))
    except DasError as e:
        fail(str(e))
    except Exception as e:  # Hydra's composition and override-grammar errors
        fail(" ".join(str(e).split()).split(" Config search path")[0])


@hydra.main(version_base="1.3", config_path=str(C.conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from .sweep import run

    try:
        frame = run(cfg, HydraConfig.get().runtime.output_dir)
    except DasError as e:
        fail(str(e))
    failed = int(frame["error"].notna().sum()) if "error" in frame else 0
    if failed:
        logging.getLogger(__name__).error("%d cell(s) failed; see the error column of iia.csv", failed)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(1)


def main() -> None:
    preflight(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
