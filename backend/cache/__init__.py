"""State shared between processes, in Redis or in-process: image embeddings, per-task prompt sessions, locks."""
