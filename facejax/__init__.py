"""facejax: JAX/Flax training and retrieval for image similarity search."""
__version__ = "0.1.0"
