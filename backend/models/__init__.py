"""SAM and GroundingDINO behind small interfaces (`base`), their official checkpoints and background loading."""
