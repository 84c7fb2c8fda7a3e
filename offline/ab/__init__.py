"""A/B experiment analysis: per-turn outcome schema, a DuckDB-over-Parquet metrics store,
cluster-robust statistics (delta method, SRM check) and rich/JSON reports."""
