"""Data layer: sources -> decode-once cache -> splits (prepare_data), then the input pipeline."""
