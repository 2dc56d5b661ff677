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
