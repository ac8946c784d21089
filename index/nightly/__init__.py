"""The nightly re-index: embed new images, update centroids, build, gate, publish."""
