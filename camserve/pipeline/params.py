"""Request parameters: what to explain and how to answer, parsed and checked before any work.

Parameters come from three places, which may be combined when they do not contradict:

* the query string (``?methods=gradcam,layercam&target=topk&topk=3``), on the routes where
  TorchServe 0.12 forwards it to the handler: ``/NAME[/VERSION]/predict`` and
  ``/invocations?model_name=NAME`` (it drops it on ``/predictions`` and ``/explanations``);
* the ``X-Camserve-Params`` header, on every route, in the same query syntax or as JSON;
* a JSON form field named ``params`` in a multipart request
  (``{"methods": ["gradcam"], "target": [3, 7]}``).

=============  =====================================  =======================================
name           values                                 default
=============  =====================================  =======================================
methods        comma list or JSON list of CAM names   ``gradcam`` (a detector: ``eigencam``)
target         ``top1``, ``topk`` or class indices     ``top1`` (a detector: every
                                                      detection; classes filter them)
topk           integer >= 1 (used by ``target=topk``)  3
output         ``png``, ``overlay``, ``array``,        ``png`` when explaining, else ``none``
               ``summary`` or ``none`` (comma list)
aug_smooth     boolean (true/false/1/0/yes/no)        false
eigen_smooth   boolean                                false
explain        boolean: explanations on               true on ``/explanations``, else false
components     integer 1..32: concepts per image of   16 (pytorch-grad-cam's default)
               method ``dff`` (only with ``dff``)
metrics        comma list of faithfulness metrics:    none
               ``road``, ``road_morf``, ``road_lerf``,
               ``confidence_change``, ``drop``,
               ``increase`` (:mod:`camserve.faithfulness`)
score          what gradient methods explain:         ``logit`` (``binary`` on a
               ``logit``, ``softmax`` (probability),  one-output sigmoid head)
               ``binary`` (:mod:`camserve.heads`)
threshold      number in (0, 1): sigmoid heads list   the manifest's
               labels at least this probable;
               a detector answers detections
               scoring at least this
concept        embedding models: comma list of        none (or a multipart
               registered concept names               part ``concept_image``)
box            segmentation models: ``x0,y0,x1,y1``,  the predicted mask (or a
               the pixels (inclusive, sent-image      multipart part ``mask``;
               pixels) a class is explained over      :mod:`.segmentation`)
=============  =====================================  =======================================

On ``/predictions`` a request is explained when ``explain`` is true or any of ``methods``,
``target``, ``topk``, ``aug_smooth``, ``eigen_smooth``, ``metrics`` or an ``output`` other
than ``none`` is given. ``metrics`` is refused with method ``dff`` (a concept map has no
target class), and by the service beyond ``limits.max_metric_maps`` maps (images x targets
x methods) per request: ROAD costs 18 forwards and 18 sparse solves per map. Every malformed value raises :class:`~camserve.errors.InputError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from camserve.errors import InputError

PARAM_NAMES = ("methods", "target", "topk", "output", "aug_smooth", "eigen_smooth", "explain", "components", "metrics",
               "score", "threshold", "concept", "box")
SCORES = ("logit", "softmax", "binary")
JSON_FIELDS = ("params", "parameters")
OUTPUTS = ("png", "overlay", "array", "summary", "none")
DEFAULT_TOPK = 3
#: DFF's concepts per image: default (pytorch-grad-cam's) and the most a request may ask.
DEFAULT_COMPONENTS = 16
MAX_COMPONENTS = 32
#: Bounds on every parameter source (header, multipart ``params`` field, query values): a
#: JSON text or a single value longer than this, or JSON nested deeper than an object of
#: lists, is refused as ``bad_parameter`` before it is interpreted.
MAX_PARAMS_BYTES = 4096
MAX_JSON_DEPTH = 2


class UnknownParameter(InputError):
    kind = "unknown_parameter"


class BadParameter(InputError):
    kind = "bad_parameter"


@dataclass(frozen=True)
class Target:
    """What to explain per image: the top-k predicted classes, or fixed class indices."""

    topk: int | None = None
    classes: tuple[int, ...] = ()

    def describe(self) -> str | list[int]:
        return f"top{self.topk}" if self.topk is not None else list(self.classes)


@dataclass(frozen=True)
class RequestParams:
    """One request's validated parameters."""

    explain: bool = False
    methods: tuple[str, ...] = ("gradcam",)
    target: Target = Target(topk=1)
    output: tuple[str, ...] = ("none",)
    aug_smooth: bool = False
    eigen_smooth: bool = False
    components: int = DEFAULT_COMPONENTS
    metrics: tuple[str, ...] = ()
    score: str = "logit"
    threshold: float | None = None
    concepts: tuple[str, ...] = ()
    box: tuple[int, int, int, int] | None = None

    @property
    def n_targets(self) -> int:
        return self.target.topk if self.target.topk is not None else len(self.target.classes)


def as_text(name: str, value: Any) -> str:
    """A parameter value as text (TorchServe hands query values over as bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) > MAX_PARAMS_BYTES:
            raise BadParameter(f"parameter {name!r} has {len(value)} bytes, more than the limit of {MAX_PARAMS_BYTES}")
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadParameter(f"parameter {name!r} is not UTF-8 text") from None
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            raise BadParameter(f"parameter {name!r} holds a nested list or object; give a flat list")
        text = ",".join(as_text(name, v) for v in value)
    elif isinstance(value, dict):
        raise BadParameter(f"parameter {name!r} is a JSON object; give a string, a number or a list")
    else:
        text = str(value).strip()
    if len(text) > MAX_PARAMS_BYTES:
        raise BadParameter(f"parameter {name!r} has {len(text)} characters, more than the limit of {MAX_PARAMS_BYTES}")
    return text


def json_object(text: str | bytes | bytearray, source: str) -> dict[str, Any]:
    """A parameter source's JSON object, bounded in size and depth (see :data:`MAX_PARAMS_BYTES`).

    Every failure (too long, not JSON, nested too deep for the parser or for us, not an
    object) is a :class:`BadParameter` naming ``source``: nothing a client sends can make
    parameter parsing raise anything else.
    """
    if len(text) > MAX_PARAMS_BYTES:
        raise BadParameter(f"{source} has {len(text)} bytes, more than the limit of {MAX_PARAMS_BYTES}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadParameter(f"{source} is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadParameter(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadParameter(f"{source} must be a JSON object, got {type(value).__name__}")
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadParameter(f"{source} is nested too deeply (at most {MAX_JSON_DEPTH} levels: an object of lists)")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of containers in a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = as_text(name, value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BadParameter(f"parameter {name}={text!r} is not a boolean (use true or false)")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise BadParameter(f"parameter {name}={value!r} is not an integer")
    if isinstance(value, int):
        return value
    text = as_text(name, value)
    try:
        return int(text)
    except ValueError:
        raise BadParameter(f"parameter {name}={text!r} is not an integer") from None


def _names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        items = [as_text(name, v).lower() for v in value]
    else:
        items = [v.strip().lower() for v in as_text(name, value).split(",")]
    if not items or any(not v for v in items):
        raise BadParameter(f"parameter {name}={as_text(name, value)!r} has an empty entry")
    return tuple(dict.fromkeys(items))  # drop repeats, keep order


def _score(value: Any) -> str:
    text = as_text("score", value).lower()
    if text not in SCORES:
        raise BadParameter(f"parameter score={text!r} is not one of {', '.join(SCORES)}")
    return text


def _threshold(value: Any) -> float:
    text = as_text("threshold", value)
    try:
        number = float(text)
    except ValueError:
        raise BadParameter(f"parameter threshold={text!r} is not a number") from None
    if not 0.0 < number < 1.0:
        raise BadParameter(f"parameter threshold={text!r} is out of range (0, 1)")
    return number


def _box(value: Any) -> tuple[int, int, int, int]:
    """``x0,y0,x1,y1`` (or a list of four): non-negative integers, corners inclusive."""
    parts = as_text("box", value).split(",")  # (not _names: it drops repeated values)
    try:
        x0, y0, x1, y1 = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise BadParameter(f"parameter box={as_text('box', value)!r} must be four integers x0,y0,x1,y1") from None
    if min(x0, y0) < 0 or x1 < x0 or y1 < y0:
        raise BadParameter(f"parameter box={x0},{y0},{x1},{y1} must have 0 <= x0 <= x1 and 0 <= y0 <= y1")
    return x0, y0, x1, y1


def _metrics(value: Any) -> tuple[str, ...]:
    from camserve.faithfulness import parse_metrics

    try:
        return parse_metrics(_names("metrics", value))
    except BadParameter:
        raise
    except InputError as exc:
        raise BadParameter(f"parameter metrics: {exc}") from None


def _target(value: Any, topk: int, num_classes: int) -> Target:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        text = as_text("target", value).lower()
        if text == "top1":
            return Target(topk=1)
        if text == "topk":
            return Target(topk=topk)
        if text.startswith("top") and text[3:].isdigit():
            return Target(topk=int(text[3:]))
        value = [v.strip() for v in text.split(",")]
    classes = []
    for item in value:
        try:
            index = _int("target", item)
        except BadParameter:
            raise BadParameter(
                f"parameter target={as_text('target', value)!r}: {item!r} is not top1, topk or a class index"
            ) from None
        if not 0 <= index < num_classes:
            raise BadParameter(f"parameter target: class index {index} is out of range (model has {num_classes} classes, 0..{num_classes - 1})")
        classes.append(index)
    if not classes:
        raise BadParameter("parameter target is empty")
    return Target(classes=tuple(dict.fromkeys(classes)))


def merge_sources(query: Mapping[str, Any], json_field: Any | None) -> dict[str, Any]:
    """Combine query-string values with the JSON form field; a contradiction is an error."""
    merged: dict[str, Any] = dict(query)
    if json_field is None:
        return merged
    if isinstance(json_field, (bytes, bytearray, str)):
        json_field = json_object(json_field, "the params field")
    if not isinstance(json_field, dict):
        raise BadParameter(f"the params field must be a JSON object, got {type(json_field).__name__}")
    for key, value in json_field.items():
        if key not in PARAM_NAMES:
            raise UnknownParameter(f"unknown parameter {key!r} in the params field (known: {', '.join(PARAM_NAMES)})")
        if key in merged and as_text(key, merged[key]).lower() != as_text(key, value).lower():
            raise BadParameter(f"parameter {key!r} is given twice with different values: {as_text(key, merged[key])!r} and {as_text(key, value)!r}")
        merged[key] = value
    return merged


def parse_params(
    raw: Mapping[str, Any],
    *,
    num_classes: int,
    known_methods: Iterable[str],
    explain_default: bool = False,
    max_targets: int = 10,
    max_methods: int = 4,
    default_methods: tuple[str, ...] = ("gradcam",),
    default_target: Target = Target(topk=1),
) -> RequestParams:
    """Validate raw parameter values (see the module docstring) into :class:`RequestParams`.

    ``default_methods`` and ``default_target`` are the model kind's defaults (a detector:
    ``eigencam`` over every detection, ``Target()``)."""
    for key in raw:
        if key not in PARAM_NAMES:
            raise UnknownParameter(f"unknown parameter {key!r} (known: {', '.join(PARAM_NAMES)})")
    known = tuple(known_methods)
    asks = any(k in raw for k in ("methods", "target", "topk", "aug_smooth", "eigen_smooth", "components", "metrics", "score", "concept",
                                  "box"))
    threshold = _threshold(raw["threshold"]) if "threshold" in raw else None
    output = _names("output", raw["output"]) if "output" in raw else None
    for form in output or ():
        if form not in OUTPUTS:
            raise BadParameter(f"parameter output={form!r} is not one of {', '.join(OUTPUTS)}")
    if output and "none" in output and len(output) > 1:
        raise BadParameter(f"parameter output={','.join(output)!r}: 'none' cannot be combined with other forms")
    explain = _bool("explain", raw["explain"]) if "explain" in raw else (explain_default or asks or (output not in (None, ("none",))))
    if not explain:
        if output not in (None, ("none",)) or asks:
            raise BadParameter("parameter explain=false contradicts the explanation parameters given")
        return RequestParams(explain=False, threshold=threshold, target=default_target)
    methods = _names("methods", raw["methods"]) if "methods" in raw else default_methods
    for method in methods:
        if method not in known:
            raise BadParameter(f"unknown method {method!r} (known: {', '.join(known)})")
    if len(methods) > max_methods:
        raise BadParameter(f"parameter methods asks for {len(methods)} methods, more than the limit of {max_methods}")
    topk = _int("topk", raw["topk"]) if "topk" in raw else min(DEFAULT_TOPK, num_classes)
    if not 1 <= topk <= num_classes:
        raise BadParameter(f"parameter topk={topk} is out of range (1..{num_classes})")
    target = _target(raw["target"], topk, num_classes) if "target" in raw else (Target(topk=topk) if "topk" in raw else default_target)
    if target.topk is not None and not 1 <= target.topk <= num_classes:
        raise BadParameter(f"parameter target=top{target.topk} is out of range (1..{num_classes})")
    params = RequestParams(
        explain=True,
        methods=methods,
        target=target,
        output=output or ("png",),
        aug_smooth=_bool("aug_smooth", raw["aug_smooth"]) if "aug_smooth" in raw else False,
        eigen_smooth=_bool("eigen_smooth", raw["eigen_smooth"]) if "eigen_smooth" in raw else False,
        components=_int("components", raw["components"]) if "components" in raw else DEFAULT_COMPONENTS,
        metrics=_metrics(raw["metrics"]) if "metrics" in raw else (),
        score=_score(raw["score"]) if "score" in raw else "logit",
        threshold=threshold,
        concepts=_names("concept", raw["concept"]) if "concept" in raw else (),
        box=_box(raw["box"]) if "box" in raw else None,
    )
    if params.metrics and "dff" in methods:
        raise BadParameter("parameter metrics is not defined for method dff (a concept map has no target class to score)")

    if "components" in raw and "dff" not in methods:
        raise BadParameter("parameter components applies to method dff only")
    if not 1 <= params.components <= MAX_COMPONENTS:
        raise BadParameter(f"parameter components={params.components} is out of range (1..{MAX_COMPONENTS})")
    if params.n_targets > max_targets:
        raise BadParameter(f"the request asks for {params.n_targets} targets, more than the limit of {max_targets}")
    if output == ("none",):
        return RequestParams(explain=False, threshold=threshold, target=target)
    return params
