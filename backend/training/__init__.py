"""Active learning: a project's annotations become a training set, fine-tuned SAM decoders, and versions."""
