"""What runs inside an inference worker process (INFERENCE=queue): the RQ worker loop and the jobs it runs."""
