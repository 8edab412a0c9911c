import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings every end-to-end run shares; each test adds its own grid.
TINY = ["dataset.n_train=24", "dataset.n_test=12", "train.epochs=1", "train.batch_size=8", "progress=false"]


def das_cli_command() -> list[str]:
    """The das-cli of the interpreter running the tests, not whichever one PATH finds first."""
    exe = Path(sys.executable).parent / "das-cli"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "das_cli.cli"]


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(das_cli_command() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second intra-op thread only adds synchronisation (and stalls badly when
    the CPU is shared); modules of tiny-model tests use this and get the setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def handled_by(sig: int, handler) -> Iterator[None]:
    """`sig` handled by `handler` inside the block; the handler in place before is restored after."""
    previous = signal.signal(sig, handler)
    try:
        yield
    finally:
        signal.signal(sig, previous)


def raising(message: str):
    """A signal handler that raises RuntimeError(message), as submitit's pre-emption handler raises."""
    def handler(signum, frame):
        raise RuntimeError(message)

    return handler


@pytest.fixture
def ignored_sigterm():
    """SIGTERM handled by a function that returns, as submitit's handler does (a plain `scancel` sends SIGTERM,
    then SIGKILL after SLURM's KillWait). Yields the signals seen."""
    seen = []
    with handled_by(signal.SIGTERM, lambda signum, frame: seen.append(signum)):
        yield seen


def fitted_intervention(name: str, n: int, options: dict):
    """The method `name` on a site of width n, estimated where it is (random activations of two classes, or
    random Jacobians), its trained parameters moved off their start; in eval mode."""
    from das_cli.interventions import SiteActivations, build_intervention

    module = build_intervention(name, n, **options)
    if module.needs_activations:
        module.fit_activations(SiteActivations(torch.randn(40, n), torch.arange(40) % 2, ["a", "b"]))
    if module.needs_model:  # sparse_basis: its rotation from random Jacobians
        module.fit_jacobians({"output": torch.randn(4, n, 5)})
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    return module.eval()


@pytest.fixture(autouse=True, scope="session")
def _sigint_raises_keyboard_interrupt():
    """The Ctrl-C tests raise SIGINT in this process (and their das-cli subprocesses inherit its disposition). A
    suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored,
    and Python then keeps it ignored: give it Python's own handler back, as an interactive start has it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True, scope="session")
def _embedded_tokenizer_read_once():
    """Every tiny random model uses the embedded tokenizer; the in-process runs of a session read its files
    once (0.3 s a read) instead of once per run."""
    from das_cli import models

    real = models.embedded_tokenizer
    models.embedded_tokenizer = functools.cache(real)
    yield
    models.embedded_tokenizer = real


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def slurm_missing() -> str | None:
    """Why the `slurm` tests cannot run here, or None when a SLURM controller answers."""
    if not shutil.which("sbatch"):
        return "needs SLURM (sbatch); `bash .ci/slurm_cluster.sh up` brings a test cluster up"
    try:
        subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return "no SLURM controller answers; `bash .ci/slurm_cluster.sh up` brings a test cluster up"
    return None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    slurm = [item for item in items if "slurm" in item.keywords]
    missing = slurm_missing() if slurm else None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
    for item in slurm if missing else []:
        item.add_marker(pytest.mark.skip(reason=missing))
    # The SLURM tests' file is the longest (minutes of waiting on the cluster): run it first, so that with one test
    # file per worker (pytest -n auto --dist loadfile) the other files fill the other workers meanwhile.
    first = {item.path for item in slurm} if not missing else set()
    items[:] = sorted(items, key=lambda item: item.path not in first)
