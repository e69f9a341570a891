"""Active learning: webhook events become a training set; fine-tuning writes decoder versions (`backend.decoders`)."""
