"""An index version plus the model that embeds its queries: images in, ranked lists out.

`SearchEngine(index_path)` opens the version CURRENT names (sha256-verified by default) and the
model recorded with it (manifest "model_dir", written by build_index --model); a model given
explicitly must be that same model (same id). Images are decoded and embedded by
`model.embedding.ModelRunner` (the embed job's code), searched by `index.ann.search`, re-ranked by
`index.rerank.backends` (query.py's chain), so a search here ranks exactly as embed -> query does.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Ranked", "SearchEngine", "model_identity"]


class ModelMismatchError(ValueError):
    """A model directory that is not the one the index was built with."""


def model_identity(model_dir: str) -> str:
    """The model id (weights + config, model.checkpoint.read_model_id) of a model directory,
    without building the network."""
    from model.checkpoint import CONFIG_FILE, MODEL_FILE, read_model_id

    try:
        return read_model_id(str(model_dir))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(
            f"--model {model_dir}: not a model directory ({MODEL_FILE} + {CONFIG_FILE})") from None


@dataclass
class Ranked:
    """Ranked lists of Q queries. item_ids: (Q, k) object (None padding); image_ids: (Q, k)
    object or None (centroid index); scores: (Q, k) float32 descending; valid: (Q, k) bool."""

    item_ids: np.ndarray
    image_ids: np.ndarray | None
    scores: np.ndarray
    valid: np.ndarray


class SearchEngine:
    """One opened index version and its model. Thread-safe for concurrent `search_images`."""

    def __init__(self, index_path: str, model_dir: str | None = None, verify: bool = True,
                 version: str | None = None, device: str = "cpu", threads: int | None = None,
                 runner=None):
        from index.ann.search import open_index

        self.index = open_index(index_path, verify=verify, version=version)
        try:
            recorded = self.index.manifest.get("model_dir")
            want = self.index.input_model
            if runner is not None and runner.model_id == want:
                self.runner = runner  # same model as the previous version: no reload
            else:
                chosen = model_dir or recorded
                if not chosen:
                    raise ModelMismatchError(
                        f"index {index_path} (version {self.index.version}) records no model directory: "
                        "give --model MODEL_DIR (the model its vectors were embedded with)")
                if model_dir and model_identity(model_dir) != want:
                    raise ModelMismatchError(
                        f"--model {model_dir} is model {model_identity(model_dir)!r} but index {index_path} "
                        f"(version {self.index.version}) was built from model {want!r}")
                from model.embedding import ModelRunner

                self.runner = ModelRunner(chosen, device=device, threads=threads)
                if self.runner.model_id != want:
                    raise ModelMismatchError(f"model {chosen} is {self.runner.model_id!r} but index "
                                             f"{index_path} was built from model {want!r}")
            self.model_dir = model_dir or recorded
        except BaseException:
            self.index.close()
            raise
        self._gallery = None  # the index's source vectors, loaded on the first re-ranked search
        self._keep = None
        self._lock = threading.Lock()

    # --- what it is ---
    @property
    def name(self) -> str:
        return os.path.basename(os.path.dirname(self.index.dir))

    @property
    def version(self) -> str:
        return self.index.version

    @property
    def model_id(self) -> str:
        return self.runner.model_id

    @property
    def image_ids(self) -> frozenset:
        """The gallery image ids of this version (empty for a centroid index), computed once."""
        if getattr(self, "_image_ids", None) is None:
            _, images = self.index.lookup(np.arange(len(self.index)))
            self._image_ids = frozenset(() if images is None else images.tolist())
        return self._image_ids

    # --- work ---
    def embed(self, images: Sequence[bytes]):
        """Encoded images -> model.embedding.EmbedResult ((N, D) float32, ok (N,), reasons)."""
        return self.runner.embed_images(list(images))

    def _gallery_vectors(self, path: str | None = None):
        with self._lock:
            if self._gallery is None:
                from index.rerank.backends import JUNK_ITEM, load_index_vectors

                self._gallery = load_index_vectors(self.index, path)
                items, _ = self.index.lookup(np.arange(len(self.index)))
                self._keep = items != JUNK_ITEM
        return self._gallery, self._keep

    def search_vectors(self, vectors: np.ndarray, k: int, rerank=None,
                       gallery_vectors: str | None = None) -> Ranked:
        """(Q, D) float32 embeddings of this engine's model -> Ranked (Q, k). rerank: an
        index.rerank.chain.RerankConfig (its topk is set to k) or None. Without re-ranking, junk
        items stay in the lists as query.py leaves them."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if rerank is None or tuple(rerank.methods) == ("none",):
            hits = self.index.search(vectors, k, model=self.model_id)
            return Ranked(hits.item_ids, hits.image_ids, hits.scores, hits.valid)
        import dataclasses

        from index.rerank.backends import result_scores
        from index.rerank.chain import rerank as rerank_chain

        config = dataclasses.replace(rerank, topk=int(k))
        gallery, keep = self._gallery_vectors(gallery_vectors)

        def search(x, kk):
            hits = self.index.search(x, kk, labels=False)
            return hits.scores, hits.ids

        q = self.index.check_queries(vectors, self.model_id)
        result = rerank_chain(q, gallery, config, keep, search=search)
        items, images = self.index.lookup(result.ids)
        return Ranked(items, images, result_scores(result, config), result.ids >= 0)

    def search_images(self, images: Sequence[bytes], k: int, rerank=None,
                      gallery_vectors: str | None = None) -> tuple[Ranked | None, np.ndarray, list]:
        """Encoded images -> (Ranked of the embeddable images in order or None if none, ok (N,)
        bool, reasons: N of None or why the image was refused)."""
        res = self.embed(images)
        if not res.ok.any():
            return None, res.ok, res.reasons
        return self.search_vectors(res.embeddings[res.ok], k, rerank, gallery_vectors), res.ok, res.reasons

    def close(self) -> None:
        self.index.close()
