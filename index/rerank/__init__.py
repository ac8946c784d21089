"""Re-ranking: k-reciprocal, query expansion / database augmentation, diffusion, search backends."""
