"""Project-wide runs that page through a Label Studio project: whole-project pre-annotation."""
