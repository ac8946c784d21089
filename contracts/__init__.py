"""The file contracts between stages (docs/design.md) and the atomic storage helpers.

manifest (one row per image), embeddings and centroids (vectors), query results, and the
write-to-a-temporary-name-then-rename helpers every output goes through. Both `model` and
`index` import this package; it imports neither.
"""
