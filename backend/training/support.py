"""Which segmenters active learning can fine-tune: Meta's SAM, whose prompt encoder and mask decoder the trainer
knows. Read from the settings alone, so the web tier (which loads no model) says the same as a worker."""

from __future__ import annotations

from backend.config import SAM_TYPES, Settings


def fine_tuning_refusal(settings: Settings) -> str | None:
    """Why active learning cannot fine-tune the configured segmenter; None when it can."""
    if settings.sam_model_type in SAM_TYPES:
        return None
    return (
        f"SAM_MODEL_TYPE={settings.sam_model_type}: active learning fine-tunes the mask decoder of Meta's SAM "
        f"({', '.join(SAM_TYPES)}) only; this model serves its published weights, and webhooks still collect "
        "training data for a later switch"
    )
