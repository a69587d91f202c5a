import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from foreign import FOREIGN, make_subject  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=sorted(FOREIGN))
def foreign_subject(request):
    """A float32 Subject of every foreign model in turn (see tests/foreign.py)."""
    return make_subject(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: extra threads only add
    synchronization, and stall badly on a shared CPU. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PAPER_THREADS = 2
"""The intra-op thread count of the slow paper and accuracy tests: their trained runs and
measured numbers depend on it (the order of floating-point reductions), so it is the same on
every machine, the 2-core CI machine's default."""


@pytest.fixture(scope="module")
def paper_threads():
    """:data:`PAPER_THREADS` threads for a module of paper-finding tests. Use with
    ``pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("paper_threads")]``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(PAPER_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished run directory of a small fcn (2 hidden layers of 16) trained 2 epochs on 120
    digits, for the probes' CLI tests (which must not write into it: pass --out)."""
    from genprobe.zoo.train import TrainConfig, train_run

    return train_run(TrainConfig(arch="fcn", dataset="digits", epochs=2, n_train=120, n_test=60,
                                 arch_options={"width": 16, "depth": 2}, device="cpu"),
                     tmp_path_factory.mktemp("tiny") / "run")
