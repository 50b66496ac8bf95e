import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RLHFKIT_DTYPE", "float32")  # tests compare numbers exactly: fp32 everywhere

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 model folder with the real Qwen tokenizer (base_model for tests)."""
    from rlhfkit.engine.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_model")))
