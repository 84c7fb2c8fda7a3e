"""Importers that turn public dialogue corpora into turn logs (schema v1) plus a truth file.

Each importer writes ``turns.jsonl`` (what the nightly job reads), ``truth.jsonl`` (what only
evaluation reads) and the rows it could not import (``quarantine.jsonl``, ``skipped.jsonl``).
"""

from offline.importers.dstc2 import Dstc2ImportSummary, import_dstc2

__all__ = ["Dstc2ImportSummary", "import_dstc2"]
