"""The machinery of specdec.py: CPU fast paths, argument checks and the KV-cache plumbing."""
