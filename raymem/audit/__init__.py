"""The memorization audit (compute core and drivers; importing this package never imports Ray).

- ``raymem.audit.metrics``: thresholds, calibration, memorization and copy figures, ground-truth scoring.
- ``raymem.audit.embeddings``: the audit on embedding-schema Parquet inputs (``audit_embeddings``, ``run_audit``).
- ``raymem.audit.images``: the audit from images and a detector; ``raymem.audit.report``: report.html.
"""
