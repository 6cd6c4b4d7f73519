"""``camserve explain IMAGE...``: ask a running server, write overlays and JSON next to inputs.

Standard library only (urllib), so the client runs anywhere Python does. Each image is
POSTed as its own request with an ``image/*`` content type (TorchServe rejects form-encoded
bodies) to ``/explanations/NAME[/VERSION]``; parameters travel in the ``X-Camserve-Params``
header. For an
input ``cat.jpg`` it writes ``cat.camserve.json`` (the answer, images left out) and
``cat.<method>.<class>.overlay.png`` (and ``.heatmap.png`` when ``png`` output is asked).
Any failure prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from camserve.errors import CamserveError


DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(CamserveError):
    kind = "client_error"


def token_from(args: argparse.Namespace) -> str | None:
    """The inference token: --token, else the key file of --key-file or --run-dir, else none."""
    if args.token:
        return args.token
    path = Path(args.key_file) if args.key_file else (Path(args.run_dir) / "key_file.json" if args.run_dir else None)
    if path is None or not path.is_file():
        if args.key_file:
            raise ClientError(f"key file {path} does not exist")
        return None
    try:
        return json.loads(path.read_text())["inference"]["key"]
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"key file {path} has no inference key") from None


def server_url(run_dir: str | None) -> str:
    """The inference address of ``camserve serve --run-dir RUN_DIR``, else the default one."""
    state = Path(run_dir) / "state.json" if run_dir else None
    if state is not None and state.is_file():
        try:
            return json.loads(state.read_text())["inference_url"]
        except (ValueError, KeyError):
            raise ClientError(f"{state} is not a camserve server state file") from None
    return DEFAULT_URL


def explain_url(url: str, model: str, version: str | None, route: str = "explanations") -> str:
    return f"{url.rstrip('/')}/{route}/{urllib.parse.quote(model)}" + (f"/{urllib.parse.quote(version)}" if version else "")


def post_image(url: str, data: bytes, content_type: str, token: str | None, timeout: float,
               params: dict[str, str | None] | None = None) -> dict[str, Any]:
    """POST one image; the JSON answer, or :class:`ClientError` naming the server's complaint.

    Parameters travel in the ``X-Camserve-Params`` header (TorchServe drops the query
    string on ``/explanations``).
    """
    headers = {"Content-Type": content_type}
    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
    if query:
        headers["X-Camserve-Params"] = query
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            err = json.loads(body)
            detail = err.get("error", {}).get("message") or err.get("message") or body.decode(errors="replace")
            kind = err.get("error", {}).get("kind") or err.get("type") or ""
        except ValueError:
            detail, kind = body.decode(errors="replace").strip()[:300], ""
        if kind == "InvalidKeyException":  # TorchServe's answer to a missing or wrong token (400, not 401)
            detail = (f"{detail.rstrip('.')}. The server wants its inference token: pass --run-dir RUN_DIR "
                      f"(the folder given to camserve serve, default serve_run), --key-file or --token")
        raise ClientError(f"HTTP {exc.code} {kind}: {detail}".replace("  ", " ")) from None
    except urllib.error.URLError as exc:
        raise ClientError(f"cannot reach {url}: {exc.reason}") from None
    except (TimeoutError, ConnectionError) as exc:  # after connecting: read timeout, reset
        raise ClientError(f"no answer from {url}: {exc or type(exc).__name__}") from None
    except ValueError:
        raise ClientError(f"the server at {url} did not answer JSON") from None


def write_outputs(image: Path, answer: dict[str, Any], out_dir: Path | None) -> list[Path]:
    """Overlay/heatmap PNGs and the JSON (with base64 images stripped) next to ``image``."""
    folder = out_dir or image.parent
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in answer.get("images", []):
        for exp in entry.get("explanations", []):
            stem = f"{image.stem}.{exp['method']}.{exp['target']['index']}"
            for key, suffix in (("overlay", "overlay"), ("png", "heatmap")):
                if key in exp:
                    path = folder / f"{stem}.{suffix}.png"
                    path.write_bytes(base64.b64decode(exp.pop(key)))
                    exp[f"{key}_file"] = path.name
                    written.append(path)
    path = folder / f"{image.stem}.camserve.json"
    path.write_text(json.dumps(answer, indent=2) + "\n")
    written.append(path)
    return written


def _run(args: argparse.Namespace) -> int:
    token = token_from(args)
    params = {
        "methods": args.methods,
        "target": args.target,
        "topk": None if args.topk is None else str(args.topk),
        "output": args.output,
        "aug_smooth": "true" if args.aug_smooth else None,
        "eigen_smooth": "true" if args.eigen_smooth else None,
        "metrics": args.metrics,
    }
    url = explain_url(args.url or server_url(args.run_dir), args.model, args.version)
    for name in args.images:
        image = Path(name)
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read {image}: {exc.strerror}") from None
        content_type = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
        if not content_type.startswith("image/"):
            content_type = "application/octet-stream"
        try:
            answer = post_image(url, data, content_type, token, args.timeout, params)
        except ClientError as exc:
            raise ClientError(f"{image}: {exc}") from None
        written = write_outputs(image, answer, Path(args.out_dir) if args.out_dir else None)
        top = answer["images"][0]["predictions"][0] if answer.get("images") else {}
        print(f"{image}: {top.get('label')} ({top.get('score', 0):.3f}) -> {', '.join(str(p) for p in written)}")
        for entry in answer.get("images", [])[:1]:
            for exp in entry.get("explanations", []):
                if "metrics" in exp:
                    shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4g}'}" for k, v in exp["metrics"].items())
                    print(f"  {exp['method']} -> {exp['target']['label']}: {shown}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("explain", help="explain images with a running camserve server")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP)")
    p.add_argument("--url", help=f"inference API address (default: the --run-dir server's, else {DEFAULT_URL})")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--version", help="model version (default: the server's default)")
    p.add_argument("--methods", help="comma-separated CAM methods (server default gradcam)")
    p.add_argument("--target", help="top1, topk or comma-separated class indices")
    p.add_argument("--topk", type=int, help="number of classes for target=topk")
    p.add_argument("--output", default="overlay", help="png, overlay, array, summary or none (default overlay)")
    p.add_argument("--aug-smooth", action="store_true")
    p.add_argument("--eigen-smooth", action="store_true")
    p.add_argument("--metrics", help="faithfulness metrics per explanation: road, road_morf, road_lerf, "
                                     "confidence_change, drop, increase (comma list; ROAD costs 18 forwards per map)")
    p.add_argument("--out-dir", help="write results here instead of next to the inputs")
    p.add_argument("--token", help="inference token (else read from --key-file or --run-dir)")
    p.add_argument("--key-file", help="TorchServe key_file.json")
    p.add_argument("--run-dir", default="serve_run", help="camserve serve's run folder (for its key file)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.set_defaults(func=_run)
