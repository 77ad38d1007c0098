import pytest

from tests.conftest import tiny_run


@pytest.fixture
def run_dict(prepared, tmp_path):
    """A seconds-long run on the small corpus (tests.conftest.tiny_run); tests override what they exercise."""

    def make(model=None, **train):
        return tiny_run(prepared, model, **{"out_dir": str(tmp_path / "run"), **train})

    return make
