"""The Label Studio wire format: label configs, result JSON and the HTTP routes."""
