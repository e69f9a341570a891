"""SAM + GroundingDINO ML backend for Label Studio."""
