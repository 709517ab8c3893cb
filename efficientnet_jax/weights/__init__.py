"""Weight importers from other EfficientNet implementations (see `keras.py`)."""
