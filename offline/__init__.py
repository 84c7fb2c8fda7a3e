"""qrw offline side: turn-log schema, importers, simulator, the nightly job and its models,
publishing and evaluation. May import :mod:`rewrite`; never the other way round."""
