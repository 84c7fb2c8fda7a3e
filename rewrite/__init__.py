"""qrw online library: text normalization, the Redis store, the Rewriter pipeline and the gRPC
service. Never imports :mod:`offline`."""

__version__ = "0.1.0"
