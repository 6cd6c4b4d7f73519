"""camserve serve's set-up without starting TorchServe: Java detection, the generated
config, port checks, and how the client finds the server and its token."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from camserve.config import Config
from camserve.serving.torchserve.java import JavaError, find_java
from camserve.serving.torchserve.server import properties
from camserve.config import PORT_FIELDS

PORTS = PORT_FIELDS  # every port camserve serve opens, all free ones in tests


def test_java_detection_messages(tmp_path):
    with pytest.raises(JavaError, match="apt-get install openjdk-17-jre-headless"):
        find_java({"PATH": str(tmp_path)})
    with pytest.raises(JavaError, match="has no bin/java"):
        find_java({"JAVA_HOME": str(tmp_path)})
    old = tmp_path / "old" / "bin"
    old.mkdir(parents=True)
    (old / "java").write_text('#!/bin/sh\necho \'java version "1.8.0_292"\' >&2\n')
    (old / "java").chmod(stat.S_IRWXU)
    with pytest.raises(JavaError, match="Java 8, too old"):
        find_java({"JAVA_HOME": str(old.parent)})
    if os.environ.get("JAVA_HOME") or __import__("shutil").which("java"):
        assert Path(find_java()).name == "java"


def test_properties_open_inference_only_when_asked(tmp_path):
    config = Config()
    text = properties(config, tmp_path, tmp_path, [], inference_host="0.0.0.0")
    assert "inference_address=http://0.0.0.0:8080" in text and "management_address=http://127.0.0.1:8081" in text
    assert "disable_token_authorization=false" in text and "enable_model_api=false" in text
    assert "grpc_management_port=7071" in text


def test_taken_port_is_refused_before_starting(tmp_path):
    import socket

    from camserve.serving.torchserve.server import ServerError, start

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "x.mar").write_bytes(b"")  # never read: the port check comes first
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        config = Config().with_overrides({"server": {**{p: 0 for p in PORTS}, "grpc_inference_port": taken}})
        with pytest.raises(ServerError, match=f"grpc inference port {taken} on 127.0.0.1 is not available"):
            start(config, run_dir=tmp_path / "run", model_store=tmp_path / "store")
    assert not (tmp_path / "run" / "state.json").exists()


def test_client_finds_url_and_token_in_the_run_folder(tmp_path):
    import argparse

    from camserve.serving.client import ClientError, server_url, token_from

    assert server_url(str(tmp_path)) == "http://127.0.0.1:8080"
    (tmp_path / "state.json").write_text(json.dumps({"inference_url": "http://127.0.0.1:1234"}))
    assert server_url(str(tmp_path)) == "http://127.0.0.1:1234"
    args = argparse.Namespace(token=None, key_file=None, run_dir=str(tmp_path))
    assert token_from(args) is None  # token auth off: no key file
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "abc"}}))
    assert token_from(args) == "abc"
    assert token_from(argparse.Namespace(token="xyz", key_file=None, run_dir=None)) == "xyz"
    with pytest.raises(ClientError, match="does not exist"):
        token_from(argparse.Namespace(token=None, key_file=str(tmp_path / "nope.json"), run_dir=None))


def test_a_free_port_taken_before_torchserve_binds_it_is_retried(monkeypatch, tmp_path):
    """Port 0 means "a free one": found by bind-and-release, so a busy host can take it first
    (seen in CI: 'Address already in use' from the gRPC port); the start is retried then."""
    from camserve.config import PORT_FIELDS, load_config
    from camserve.serving.torchserve import server

    calls = []

    def flaky(config, **kwargs):
        calls.append({name: getattr(config.server, name) for name in PORT_FIELDS})
        if len(calls) == 1:
            raise server.ServerError("TorchServe exited during start (bind(..) failed: Address already in use)")
        return "instance"

    monkeypatch.setattr(server, "_start", flaky)
    auto = load_config(env={}, overrides={"server": {p: 0 for p in PORT_FIELDS}})
    assert server.start(auto, run_dir=tmp_path, model_store=tmp_path) == "instance" and len(calls) == 2
    calls.clear()
    fixed = load_config(env={}, overrides={"server": {p: 20000 + i for i, p in enumerate(PORT_FIELDS)}})
    import pytest

    with pytest.raises(server.ServerError, match="already in use"):
        server.start(fixed, run_dir=tmp_path, model_store=tmp_path)
    assert len(calls) == 1  # a port the user chose is not silently replaced
