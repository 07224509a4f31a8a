import os

import pytest
import torch

# Tests never reach a model hub; everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Without CUDA the Triton kernels run in the interpreter on CPU tensors. Triton reads
# this when a kernel is first defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    """Seeds torch's global generator so each test draws the same inputs every run."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from model import packaged_model_path

    return packaged_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from model import BiEncoder

    return BiEncoder.from_pretrained(minilm_path)
