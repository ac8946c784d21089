"""Images and networks: dataset ingest, shards, backbones, losses, sampling, checkpoints.

Never imports `index`, `pipelines` or `cluster`.
"""
