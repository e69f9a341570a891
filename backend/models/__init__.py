"""The models (SAM, later GroundingDINO and training) and how their weights are found and loaded."""
