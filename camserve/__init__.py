"""camserve: production CAM explanations for vision models served by TorchServe.

The request path (``camserve.pipeline.runtime``, ``camserve.cam``, rendering, the handler) uses
ONNX Runtime, numpy and OpenCV only; torch is imported by the offline export step
(``camserve.export``) alone.
"""

__version__ = "0.1.0"
