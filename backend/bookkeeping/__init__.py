"""What the backend records about a project's tasks under MODEL_DIR, beside the work itself: the tasks Label Studio
imported (for encoding ahead) and the images whose embedding was cached (for /status)."""
