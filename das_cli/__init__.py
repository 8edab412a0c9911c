"""das-cli: Distributed Alignment Search sweeps from the command line.

Notebook use: `table = das_cli.run(das_cli.compose(["model=gpt2", "layers=[8]"]), "outputs/nb")`.
"""

from .config import compose
from .sweep import run

__version__ = "0.1.0"
__all__ = ["compose", "run"]
