"""Turning what Label Studio sends (smart regions, text, label names) into model prompts."""
