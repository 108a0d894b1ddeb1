"""The long-document QA API: ``Engine`` (load, prefill, open, generate) and ``Document`` (ask)."""
