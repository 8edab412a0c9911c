"""das-cli: Distributed Alignment Search sweeps from the command line.

Notebook use: `table = das_cli.run(das_cli.compose(["model=gpt2", "layers=[8]"]), "outputs/nb")`.
A finished cell as an artefact: `cell = das_cli.load_cell("outputs/nb/cells/<id>")`, then
`with das_cli.patch(model, cell, base_ids, source_ids): model.generate(base_ids)`.
"""

__version__ = "0.1.0"
__all__ = ["compose", "run", "load_cell", "patch"]


def __getattr__(name: str):
    # Imported on first use, so `das-cli-report` and `--help` start without loading torch.
    if name == "compose":
        from .config import compose

        return compose
    if name == "run":
        from .sweep import run

        return run
    if name in ("load_cell", "patch"):
        from . import artefacts

        return getattr(artefacts, name)
    raise AttributeError(f"module 'das_cli' has no attribute {name!r}")
