"""schemathesis against the REST shim's own OpenAPI schema, over a real loopback socket: no 5xx.

A short bounded run (``FUZZ_EXAMPLES``, default 200, divided over the operations; at least 10 each).
The long run is a separate command in docs/reliability.md. The engine serves one fitted,
calibrated ROI (``cam1``/``a``) so that some generated requests reach the scoring code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip("schemathesis")

from engine.api import Engine  # noqa: E402
from http_compat.server import HttpServer  # noqa: E402
from service.serve import ServeConfig  # noqa: E402
from tests.support import png_bytes  # noqa: E402

OPERATIONS = 16                       # routes in the shim's schema, about
EXAMPLES = max(10, int(os.environ.get("FUZZ_EXAMPLES", "200")) // OPERATIONS)


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    root: Path = tmp_path_factory.mktemp("schemathesis")
    config = ServeConfig.of(data_root=root, backbone="efficientnet_lite0", input_size=32, device="cpu",
                            http_host="127.0.0.1", http_port=0, log_level="WARNING")
    engine = Engine(config.engine)
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    engine.fit_ok("cam1", "a", 0.1, images)
    engine.calibrate_ng("cam1", "a", 0.1, [1.0, 2.0])
    engine.dataset_upload("cam1", "a", "ok", images[0], "s.png", {"mm_per_px": 0.1})
    server = HttpServer(engine, config.http)
    server.start()
    yield server
    server.stop(timeout=2)
    engine.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_server_error(http_server: HttpServer, mode: str) -> None:
    # schemathesis' own pytest plugin (from_fixture / parametrize) fails under pytest 9 ("Function"
    # has no _nodeid): drive each operation's hypothesis strategy directly
    api = schemathesis.openapi.from_url(f"{http_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    seen: dict[int, int] = {}
    # the engine flushes denormals to zero in the thread that built it (engine.features); hypothesis
    # refuses to generate floats in that state, and schemathesis asks for subnormals
    torch.set_flush_denormal(False)
    try:
        for operation in operations:
            @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def call(case: Any) -> None:
                response = case.call(timeout=60)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                    response.text[:500])

            try:
                call()
            except Unsatisfiable:      # no negative case exists for an operation without inputs
                assert mode == "negative"
    finally:
        torch.set_flush_denormal(True)
    if os.environ.get("FUZZ_REPORT"):
        print(f"schemathesis {mode}: {len(operations)} operations, status counts {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= len(operations)
