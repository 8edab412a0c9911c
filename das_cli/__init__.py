"""das-cli: Distributed Alignment Search sweeps from the command line.

Notebook use: `table = das_cli.run(das_cli.compose(["model=gpt2", "layers=[8]"]), "outputs/nb")`.
"""

__version__ = "0.1.0"
__all__ = ["compose", "run"]


def __getattr__(name: str):
    # Imported on first use, so `das-cli-report` and `--help` start without loading torch.
    if name == "compose":
        from .config import compose

        return compose
    if name == "run":
        from .sweep import run

        return run
    raise AttributeError(f"module 'das_cli' has no attribute {name!r}")
