"""Vectors and ids: Parquet contracts, metrics, FAISS indexes, search and re-ranking.

Never imports `model`, `pipelines` or `cluster`.
"""
