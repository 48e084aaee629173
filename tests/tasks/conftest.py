"""Fixtures the tests of ``evaclip/tasks/*`` share (the suite-wide ones, ``teacher_file`` among them, are in
tests/conftest.py)."""
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """An ImageNet-style folder: 2 classes x 4 images of 32 px, dark vs bright."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for name, base in (("dark", 40), ("bright", 200)):
        (root / name).mkdir()
        for i in range(4):
            px = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    return str(root)
