"""camserve as a KServe model server: the ``kserve.Model`` adapter, the process, manifests.

Importing this package does not import ``kserve`` (an optional extra); its modules do."""
