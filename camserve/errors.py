"""Exception types shared by the CLI, the export step and the server.

Every error that a user can cause derives from :class:`CamserveError`; the CLI prints its
message on one line and exits 2, the handler answers it with a 4xx JSON body.
"""

from __future__ import annotations


class CamserveError(Exception):
    """A problem the user can fix (bad argument, bad input, unsupported model)."""

    #: Short machine-readable kind, used in JSON error bodies and metric labels.
    kind = "bad_request"
    #: HTTP status the server answers with.
    status = 400


class ExportError(CamserveError):
    """A model or layer that cannot be exported (names the op or module at fault)."""

    kind = "export_error"


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; the artifact is not written."""

    kind = "parity_error"


class ManifestError(CamserveError):
    """A manifest that is missing, unreadable or of an unknown schema version."""

    kind = "manifest_error"


class InputError(CamserveError):
    """A request input that cannot be used (not an image, too large, bad parameter)."""

    kind = "bad_input"
