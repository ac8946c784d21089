"""Searching with images: the code that needs both `model` (images, networks) and `index`
(vectors, FAISS). `model` and `index` never import it; the jobs in `pipelines/` do.

- `serving.inputs`: image paths from files, folders and path lists (search.py's PATH);
- `serving.engine`: an index version plus its own model: images in, ranked lists out;
- `serving.follow`: the engine of the version CURRENT names, swapped when a verified one is published;
- `serving.pictures`: ranked lists as report rows (search.py --report, evaluate.py --results --report);
- `serving.export`: the embedding model as ONNX / TorchScript with its preprocessing contract;
- `serving.app`: the Ray Serve application (serve.py) and its page.
"""
