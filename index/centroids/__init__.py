"""Centroids: one mean vector per item (and per item x camera), computed in parts and combined."""
