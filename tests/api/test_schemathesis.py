"""A bounded schemathesis run against the app's own OpenAPI document: no 5xx, and every
answer conforms to the schema (status, content type, headers, body).

Schemathesis calls the ASGI app from its own event-loop thread and runs the app's
lifespan there, so this app builds its own core from ``redis_url`` (a core made on the
test's loop could not be used from that thread). Keys use their own prefix, so nothing
here meets the other tests' data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_support import ADMIN_KEY, bearer
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from api.app import create_app
from atp import EmbeddedServer, Settings

AUTH = bearer(ADMIN_KEY)


@pytest.fixture(scope="module")
def api_schema(server: EmbeddedServer) -> Iterator[Any]:
    import redis

    with redis.Redis.from_url(server.url) as r:
        for key in r.scan_iter(match="st:*"):
            r.delete(key)
    app = create_app(
        Settings(
            redis_url=server.url,
            key_prefix="st:",
            buckets=16,
            data_dir=Path("/nonexistent"),
            admin_key=SecretStr(ADMIN_KEY),
            key_refresh_seconds=0.05,
            reaper_interval=0,
        )
    )
    # the admin key through the document's own security scheme, so that negative cases
    # that drop or break it are still generated and must get a 401
    config = SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": ADMIN_KEY}}}}
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    # a few known positions and reservations, so that generated calls also reach them
    with asgi.get_client(app) as client:
        for sku in ("SKU-1", "A", "0"):
            for loc in ("SKU-1", "DC1", "A", "0"):
                r = client.put(
                    f"/v1/positions/{sku}/{loc}",
                    json={"on_hand": 1000, "reason": "seed"},
                    headers=AUTH,
                )
                assert r.status_code == 200, r.text
        for rid, hold in (("A", 600), ("0", 0)):
            body = {
                "reservation_id": rid,
                "channel": "web",
                "lines": [{"sku": "SKU-1", "location": "SKU-1", "qty": 1}],
                "hold_seconds": hold,
            }
            assert client.post("/v1/reservations", json=body, headers=AUTH).status_code == 201
    try:
        yield schema
    finally:
        asgi.shutdown_lifespans()


def schema_valid_data_is_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's positive_data_acceptance, less the core's own refusals.

    The published limits are the widest a deployment may configure (``max_line_qty``,
    ``max_lines``, ``max_hold_seconds``, ``max_on_hand`` are settings), and one rule (one
    line per position) has no JSON Schema spelling; the core refuses those with a 422
    ``invalid_request`` problem that names the field. So it is with the allocation rules: a
    line without a location needs a route (``no_route``), a SKU with a buyer limit needs a
    ``customer_id`` (``customer_required``), both depending on the rules in force, and a
    rules document must name only declared channels (``invalid_rules``). A 412 is an
    ``If-Match`` that names another rules version than the one in force: state, too. Request
    validation itself (``validation_error``) must never refuse a request the document admits.
    """
    if response.status_code == 412:
        return None
    if response.status_code == 422 and response.json()["type"].rsplit("/", 1)[-1] in CORE_422:
        return None
    return positive_data_acceptance(ctx, response, case)


CORE_422 = {"invalid_request", "no_route", "customer_required", "invalid_rules"}


def _cases() -> list[Any]:
    # the document only: create_app touches neither the core nor Redis until its lifespan
    doc = create_app(Settings(admin_key=SecretStr(ADMIN_KEY)), core=object()).openapi()  # type: ignore[arg-type]
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            modes = [GenerationMode.POSITIVE]
            # an operation with no input at all has no invalid request to make
            if op.get("parameters") or op.get("requestBody") or op.get("security"):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                out.append(
                    pytest.param(
                        method.upper(), path, mode, id=f"{method.upper()} {path} {mode.value}"
                    )
                )
    return out


@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_api_conforms_to_its_schema(
    api_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(
            excluded_checks=[positive_data_acceptance],
            additional_checks=[schema_valid_data_is_accepted],
        )

    run()
