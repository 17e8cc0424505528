import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The bundled corpus packed into 32-token blocks once per test session (~3 s)."""
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, ensure_prepared

    cache = tmp_path_factory.mktemp("data")
    return ensure_prepared([DEFAULT_CORPUS], DEFAULT_TOKENIZER, str(cache), 32, 0.05, 0)
