"""The token-free health check on a real TorchServe whose keys expire within seconds."""

from __future__ import annotations

import json
import time

import pytest

from _server_fixture import http, tiny_export
from camserve.config import PORT_FIELDS

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def short_keys(tmp_path_factory):
    """A tiny model served with keys that expire after 6 s (TorchServe takes fractions of minutes)."""
    from camserve.serving.torchserve.archive import build_archive
    from camserve.config import load_config
    from camserve.serving.torchserve.server import start, stop

    store = tmp_path_factory.mktemp("store")
    build_archive(tiny_export(tmp_path_factory.getbasetemp()), name="tiny", version="1.0", model_store=store)
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(env={}, overrides={"server": {**{p: 0 for p in PORT_FIELDS}, "token_expiration_min": 0.1},
                                            "runtime": {"ort_threads": 1}})
    try:
        yield start(config, run_dir=run_dir, model_store=store)
    finally:
        stop(run_dir)


def test_ready_survives_an_expired_management_key(short_keys):
    instance = short_keys
    assert http("GET", instance.health_url + "/ready")[0] == 200
    old = instance.key("management")
    deadline = time.monotonic() + 60
    while http("GET", instance.management_url + "/models", headers={"Authorization": f"Bearer {old}"})[0] != 400:
        assert time.monotonic() < deadline, "the management key never expired"
        time.sleep(0.5)
    time.sleep(1.1)  # past the health check's one-second cache
    status, _, body = http("GET", instance.health_url + "/ready")
    assert status == 200 and json.loads(body) == {"status": "Ready"}, body
    assert instance.key("management") != old  # renewed with the API key, written to key_file.json
    assert http("GET", instance.health_url + "/ping")[0] == 200
