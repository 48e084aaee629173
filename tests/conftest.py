"""Shared test settings: CUDA-only tests (marked ``gpu``) skip cleanly on machines without a GPU."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    from evaclip.models import create_model

    return create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
