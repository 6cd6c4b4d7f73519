"""Installed as ``camserve._handler`` so that the TorchServe handler ships with the package.

``camserve archive`` locates ``camserve_handler.py`` here (see :func:`camserve.serving.torchserve.archive.handler_file`)
and copies only that file into the archive; TorchServe loads it as a top-level module.
"""
