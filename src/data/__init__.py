"""Datasets: the real layouts users bring, the built-in phantoms, and decoding of medical image files."""
