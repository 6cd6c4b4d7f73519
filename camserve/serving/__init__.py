"""Front-ends over the one pipeline: TorchServe (:mod:`.torchserve`, with the handler in
``camserve._handler``) and KServe (:mod:`.kserve`), plus the HTTP client for both."""
