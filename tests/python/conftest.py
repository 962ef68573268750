import os
import shutil
import pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def dsv3_bin():
    b = os.environ.get("DSV3_BIN") or shutil.which("dsv3") or str(ROOT / "build" / "dsv3")
    if not os.path.exists(b):
        pytest.skip("dsv3 binary not found: set DSV3_BIN (CTest does) or build into build/")
    return b


@pytest.fixture(scope="session")
def test_data():
    return ROOT / "tests" / "data"
