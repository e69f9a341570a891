"""The soak test: a long walk through a large project with restarts, a full cache and torn files (`make soak`)."""
