"""The run record, kept on the server: results.json and the server-internal log
(:mod:`.results`), the audit log, plots, W&B tracking, progress and metrics, the
checkpoint a resume continues from, and the final adapter's model card."""
