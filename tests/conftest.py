"""Shared test settings and fixtures: CUDA-only tests (marked ``gpu``) skip cleanly on machines without a GPU; the
tiny models and files several test modules use."""
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


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A tiny CLIP's state dict (weights drawn with std 0.2, so its features are not the init's), as a MIM teacher."""
    from evaclip.models import create_model

    clip = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
    with torch.no_grad():
        for p in clip.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(clip.state_dict(), path)
    return str(path)
