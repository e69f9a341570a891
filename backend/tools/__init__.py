"""What `python -m backend predict` and `python -m backend demo` add on top of the backend: overlays, the demo page."""
