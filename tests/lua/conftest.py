"""The script tests run twice: on the real server and on fakeredis (``core``)."""

from __future__ import annotations

import pytest

from atp import ATP


@pytest.fixture(params=["valkey", "fakeredis"])
def core(request: pytest.FixtureRequest) -> ATP:
    """The core on the real server, then on fakeredis (each test runs on both)."""
    name = "atp" if request.param == "valkey" else "fake_atp"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]
