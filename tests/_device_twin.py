"""The same export on the device post-processing path (camserve.cam.device, on ONNX Runtime's
CPU provider here), and the check that it explains what the numpy path explains."""

from __future__ import annotations

import numpy as np

from camserve.pipeline.runtime import GraphSession


def device_twin(session: GraphSession) -> GraphSession:
    """A second session over ``session``'s export with ``post_processing="device"``."""
    twin = GraphSession(session.directory, intra_op_threads=session.threads, post_processing="device")
    assert twin.post is not None
    return twin


def assert_same_explanations(got, want, methods) -> None:
    """Same classes and logits, maps within 1e-5 and signal ratios within 1e-4 (relative)."""
    assert got.classes == want.classes
    np.testing.assert_array_equal(got.logits, want.logits)
    for method in methods:
        for g, w in zip(got.cams[method], want.cams[method], strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=method)
        for g, w in zip(got.signal_ratio[method], want.signal_ratio[method], strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, err_msg=method)
