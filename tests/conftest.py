import pytest
import torch


@pytest.fixture
def seed() -> int:
    """Seeds torch's global generator so each test draws the same inputs every run."""
    torch.manual_seed(0)
    return 0
