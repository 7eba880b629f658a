"""Curation: raw chat JSONL -> validated, scrubbed, deduplicated, balanced train/eval splits."""
