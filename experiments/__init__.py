"""Reproducible studies of the EfficientNet paper (issue 8); see experiments/README.md."""
