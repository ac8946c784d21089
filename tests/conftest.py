import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MARKET_MINI = SHARED_DATA / "market1501_mini" / "Market-1501-v15.09.15"
ORL_FACES = SHARED_DATA / "orl_faces"


@pytest.fixture
def market_mini() -> Path:
    if not MARKET_MINI.is_dir():
        pytest.skip(f"real data not present: {MARKET_MINI}")
    return MARKET_MINI


@pytest.fixture
def ray_local():
    """An embedded local Ray that never attaches to another cluster."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
