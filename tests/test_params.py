"""Request parameters and configuration: defaults, parsing, and errors that name the value."""

from __future__ import annotations

import json

import pytest

from camserve.config import Config, ConfigError, Limits, load_config, to_env
from camserve.errors import InputError
from camserve.pipeline.params import RequestParams, Target, merge_sources, parse_params

METHODS = ("gradcam", "gradcam++", "layercam", "eigencam")


def parse(raw, explain_default=False, **kw):
    return parse_params(raw, num_classes=10, known_methods=METHODS, explain_default=explain_default, **kw)


def test_predictions_without_parameters_do_not_explain():
    assert parse({}) == RequestParams(explain=False)
    assert parse({"output": b"none"}).explain is False


def test_explanations_route_defaults():
    p = parse({}, explain_default=True)
    assert p.explain and p.methods == ("gradcam",) and p.target == Target(topk=1)
    assert p.output == ("png",) and not p.aug_smooth and not p.eigen_smooth


def test_query_values_as_bytes_and_lists():
    p = parse({"methods": bytearray(b"gradcam, LayerCAM"), "target": b"topk", "topk": b"4", "output": b"overlay,array", "eigen_smooth": b"yes"})
    assert p.explain and p.methods == ("gradcam", "layercam") and p.target == Target(topk=4)
    assert p.output == ("overlay", "array") and p.eigen_smooth and p.n_targets == 4
    q = parse({"methods": ["eigencam"], "target": [3, 7, 3], "aug_smooth": True})
    assert q.target == Target(classes=(3, 7)) and q.aug_smooth and q.n_targets == 2
    assert parse({"target": "2,5"}).target.classes == (2, 5)
    assert parse({"target": "top2"}).target == Target(topk=2)
    assert parse({"topk": "2"}).target == Target(topk=2)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"methods": "gradcam,nosuchcam"}, "unknown method 'nosuchcam'"),
        ({"methods": "gradcam,,layercam"}, "empty entry"),
        ({"target": "10"}, "class index 10 is out of range"),
        ({"target": "-1"}, "class index -1 is out of range"),
        ({"target": "cat"}, "'cat' is not top1, topk or a class index"),
        ({"topk": "zero"}, "topk='zero' is not an integer"),
        ({"topk": "11"}, "topk=11 is out of range"),
        ({"output": "jpeg"}, "output='jpeg' is not one of"),
        ({"output": "none,png"}, "'none' cannot be combined"),
        ({"eigen_smooth": "maybe"}, "eigen_smooth='maybe' is not a boolean"),
        ({"methdos": "gradcam"}, "unknown parameter 'methdos'"),
        ({"explain": "false", "methods": "gradcam"}, "contradicts"),
        ({"methods": b"\xff\xfe"}, "not UTF-8"),
    ],
)
def test_malformed_parameters_name_the_value(raw, message):
    with pytest.raises(InputError, match=message) as info:
        parse(raw)
    assert info.value.status == 400


def test_limits_on_targets_and_methods():
    with pytest.raises(InputError, match="5 targets, more than the limit of 4"):
        parse({"target": "topk", "topk": "5"}, max_targets=4)
    with pytest.raises(InputError, match="3 methods, more than the limit of 2"):
        parse({"methods": "gradcam,layercam,eigencam"}, max_methods=2)


def test_json_form_field_merges_with_query():
    merged = merge_sources({"output": b"png"}, json.dumps({"methods": ["gradcam"], "target": [1, 2]}).encode())
    assert parse(merged).target == Target(classes=(1, 2))
    assert merge_sources({}, {"topk": 2}) == {"topk": 2}
    assert merge_sources({"topk": b"2"}, {"topk": 2}) == {"topk": 2}  # same value twice is fine
    with pytest.raises(InputError, match="given twice with different values"):
        merge_sources({"topk": b"2"}, {"topk": 3})
    with pytest.raises(InputError, match="not valid JSON"):
        merge_sources({}, b"{methods: gradcam")
    with pytest.raises(InputError, match="must be a JSON object"):
        merge_sources({}, b"[1, 2]")
    with pytest.raises(InputError, match="unknown parameter 'colour'"):
        merge_sources({}, {"colour": "red"})


def test_config_defaults_are_safe():
    cfg = Config()
    assert cfg.server.host == "127.0.0.1" and cfg.server.token_auth and not cfg.server.model_api
    assert cfg.limits.max_pixels > 0 and cfg.limits.max_body_bytes > 0


def test_config_layers_file_env_overrides(tmp_path):
    path = tmp_path / "camserve.yaml"
    path.write_text("limits:\n  max_pixels: 1000\n  max_targets: 3\nserver:\n  batch_size: 4\n")
    env = {"CAMSERVE_LIMITS_MAX_TARGETS": "5", "CAMSERVE_SERVER_TOKEN_AUTH": "false", "CAMSERVE_CONFIG": str(path)}
    cfg = load_config(env=env, overrides={"server": {"batch_size": 2, "inference_port": None}})
    assert cfg.limits.max_pixels == 1000  # file
    assert cfg.limits.max_targets == 5  # env beats file
    assert cfg.server.batch_size == 2  # override beats file; None leaves the value alone
    assert cfg.server.inference_port == 8080 and cfg.server.token_auth is False
    assert load_config(env=to_env(cfg)) == cfg  # what the worker receives reproduces it


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CAMSERVE_LIMITS_MAX_PIXELS": "lots"}, "limits.max_pixels must be of type int, got 'lots'"),
        ({"CAMSERVE_LIMITS_MAX_PIXELS": "0"}, "limits.max_pixels must be a positive integer"),
        ({"CAMSERVE_SERVER_INFERENCE_PORT": "70000"}, "server.inference_port must be a port"),
        ({"CAMSERVE_SERVER_TOKEN_AUTH": "perhaps"}, "server.token_auth must be of type bool"),
        ({"CAMSERVE_LIMITS_MAX_PIXEL": "5"}, "unknown setting limits.max_pixel"),
        ({"CAMSERVE_RUNTIME_PROVIDERS": "tpu"}, "runtime.providers must be auto, cpu or cuda"),
        ({"CAMSERVE_CONFIG": "/nonexistent/camserve.yaml"}, "cannot read configuration file"),
    ],
)
def test_config_errors_name_the_setting(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_limits_reject_bad_values_directly():
    with pytest.raises(ConfigError, match="max_batch_size"):
        Limits(max_batch_size=-1)


def test_dff_components_are_bounded_and_belong_to_dff():
    known = {"known_methods": ("dff", "gradcam")}
    assert parse_params({"methods": "dff", "components": "5"}, num_classes=10, **known).components == 5
    assert parse_params({"methods": "dff"}, num_classes=10, **known).components == 16
    for bad in ("0", "33", "x"):
        with pytest.raises(InputError, match="components"):
            parse_params({"methods": "dff", "components": bad}, num_classes=10, **known)
    with pytest.raises(InputError, match="applies to method dff only"):
        parse_params({"methods": "gradcam", "components": "4"}, num_classes=10, **known)
