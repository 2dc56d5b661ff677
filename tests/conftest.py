import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*_flat_weights.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def quiet():
    """Silences UserWarnings (re-initialisation notes, export's) and FutureWarnings (torch's
    deprecations) for tests that check errors and values, not warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tests on tiny tensors, where intra-op threads only
    add contention (3x slower on 2 cores); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
