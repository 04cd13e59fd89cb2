import sys
from pathlib import Path

import pytest

import mlx_sdft  # noqa: F401  first: on Linux it loads OpenBLAS before MLX, as the CLI's subprocesses do

# tiny.py, and the folders' test modules, whose helpers tests in other folders import by name
# (`from test_serve import serving`) however few folders a run collects
for folder in (
    Path(__file__).parent,
    *sorted({p.parent for p in Path(__file__).parent.glob("*/test_*.py")}),
):
    sys.path.insert(0, str(folder))

from tiny import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-block llama with a ChatML tokenizer, as an mlx-lm model folder."""
    return build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model):
    from mlx_lm import load

    return load(str(tiny_model))


@pytest.fixture
def smoke_data() -> Path:
    return ROOT / "recipes" / "smoke" / "data"


@pytest.fixture
def follows_when_told(monkeypatch):
    """The random tiny model follows no rule when told, so learn would leave every rule out (or refuse
    a learn of rules alone): tests of how a rule is distilled and gated take learn's reading of every
    preflight as "follows" (the thresholds themselves stay, for the modules that import them)."""
    from mlx_sdft.jobs import learn

    monkeypatch.setattr(learn, "follows", lambda result: True)


@pytest.fixture
def trained(monkeypatch):
    """The examples of each training run learn starts."""
    from mlx_sdft.jobs import train

    runs, real = [], train.run_train

    def recorded(cfg, **kwargs):
        runs.append(kwargs["examples"]["train"])
        return real(cfg, **kwargs)

    monkeypatch.setattr(train, "run_train", recorded)
    return runs
