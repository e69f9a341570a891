"""Model execution in worker processes fed through Redis (RQ), for INFERENCE=queue."""
