"""Reproducible studies of the EfficientNet paper; see experiments/README.md."""
