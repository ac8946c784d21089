"""Sharded FAISS indexes: build, versions and atomic publish, search, PCA-whitening."""
