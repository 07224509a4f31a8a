import os

import pytest
import torch

# Tests never reach a model hub; everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def seed() -> int:
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
