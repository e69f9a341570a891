"""Serving fine-tuned mask decoders: the version files training writes, and which version each project gets."""
