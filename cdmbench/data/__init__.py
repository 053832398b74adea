"""Data: datasets to uint8 images at every resolution of a cascade, prepared once."""
