from atp import ATP


async def test_fakeredis_reserve(fake_atp: ATP) -> None:
    await fake_atp.set_position("A", "W", 5, reason="init")
    r = await fake_atp.reserve("r1", "web", [("A", "W", 2)], hold_seconds=30)
    assert r.status == "held"
    p = await fake_atp.position("A", "W")
    assert p is not None and p.committed == 2
