import os

import pytest
import torch

# Deterministic, quiet CPU runs.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): the CPU
    training and reference-model tests, which are otherwise slower on the 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cfg():
    from sglang_tpla.tiny_model import tiny_config

    return tiny_config()


@pytest.fixture(scope="session")
def tiny_sd(tiny_cfg):
    from sglang_tpla.tiny_model import random_state_dict

    return random_state_dict(tiny_cfg, seed=1)

# helper modules next to the tests (serving_utils.py) import by plain name
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
