"""Shared state in Redis (or in-process): image embeddings and per-task prompt sessions."""
