"""The one request pipeline both front-ends call: limits, parameters, decoding, ONNX Runtime,
CAM methods, rendering and metrics (:mod:`.service` ties them together; no torch here)."""
