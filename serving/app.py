"""The search service (serve.py): a Ray Serve application on FastAPI.

Routes: ``POST /search?k=10[&rerank=aqe]`` (body: the image bytes, or a multipart form with one
file) -> JSON {"index", "version", "model", "results": [{"rank", "item_id", "image_id",
"score"}]}; a bad image or parameter -> 400 {"detail": one line}. ``GET /`` the page,
``GET /images/<image_id>`` a gallery thumbnail, ``GET /healthz``.

`SearchHandler` is the work (plain Python, tested without Ray); `SearchService` the Ray Serve
deployment around it. Each replica follows CURRENT by itself (serving.follow): a thread checks
every `check_every` seconds and swaps to a newly published version once it has verified.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at
# definition time, and Request is imported inside build_app

import threading

import numpy as np

from serving.follow import CurrentFollower

__all__ = ["APP_NAME", "SERVICE_RERANKS", "BadRequest", "SearchHandler", "build_app", "start"]

APP_NAME = "centroid-search"
MAX_K = 1000
# per-request re-ranking of one query; DBA and diffusion rework the whole gallery per request
SERVICE_RERANKS = ("none", "aqe", "alpha-qe", "kreciprocal")


class BadRequest(ValueError):
    """A request the service refuses (HTTP 400), with a one-line reason."""


class SearchHandler:
    """Answers searches against the followed index version."""

    def __init__(self, index_path: str, model_dir: str | None = None, gallery_images: str | None = None,
                 threads: int | None = 1, say=print):
        self.follower = CurrentFollower(index_path, model_dir, threads=threads, say=say)
        self.gallery = None
        if gallery_images:
            from serving.gallery import GalleryImages

            self.gallery = GalleryImages(gallery_images, self.follower.engine.image_ids)

    def rerank_config(self, rerank: str, k: int):
        from index.rerank.chain import RerankConfig

        try:
            methods = RerankConfig.parse_methods(rerank or "none")
        except ValueError as e:
            raise BadRequest(str(e).splitlines()[0]) from None
        refused = [m for m in methods if m not in SERVICE_RERANKS]
        if refused:
            raise BadRequest(f"rerank {','.join(refused)} is not offered by the service "
                             f"(offered: {', '.join(SERVICE_RERANKS)})")
        return None if methods == ("none",) else RerankConfig(methods=methods, topk=k)

    def answer(self, data: bytes, k: int = 10, rerank: str = "none") -> dict:
        """One image's ranked list as the response JSON. Raises BadRequest."""
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be in 1..{MAX_K}, got {k}")
        if not data:
            raise BadRequest("empty request: send the image bytes as the body (or a multipart file)")
        config = self.rerank_config(rerank, k)
        engine = self.follower.engine  # one version for the whole request
        ranked, ok, reasons = engine.search_images([data], k, config)
        if not ok[0]:
            raise BadRequest(reasons[0] or "unusable image")
        valid = np.flatnonzero(ranked.valid[0])
        results = [{"rank": int(r), "item_id": str(ranked.item_ids[0, c]),
                    "image_id": None if ranked.image_ids is None else str(ranked.image_ids[0, c]),
                    "score": float(ranked.scores[0, c])} for r, c in enumerate(valid)]
        return {"index": engine.name, "version": engine.version, "model": engine.model_id,
                "results": results}

    def thumbnail(self, image_id: str) -> bytes | None:
        """JPEG bytes, None when there is no picture; BadRequest when refused."""
        from serving.gallery import ImageRefused

        if self.gallery is None:
            return None
        try:
            return self.gallery.thumbnail(image_id, self.follower.engine.image_ids)
        except ImageRefused as e:
            raise BadRequest(str(e)) from None
        except (OSError, ValueError):  # an unreadable gallery file: no picture, not a failure
            return None

    def health(self) -> dict:
        e = self.follower.engine
        return {"status": "ok", "index": e.name, "version": e.version, "model": e.model_id,
                "vectors": len(e.index), "refused_versions": dict(self.follower.refused)}


def _first_file(form):
    for value in form.values():
        if hasattr(value, "read"):
            return value
    return None


def build_app(index_path: str, model_dir: str | None = None, gallery_images: str | None = None,
              replicas: int = 1, check_every: float = 1.0, threads: int = 1, num_cpus: float = 1.0):
    """The bound Ray Serve application."""
    import asyncio

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, Response
    from ray import serve

    from serving.page import PAGE

    api = FastAPI(title="centroid retrieval search")

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=32, health_check_period_s=5)
    @serve.ingress(api)
    class SearchService:
        def __init__(self):
            import logging

            log = logging.getLogger("ray.serve")
            self.handler = SearchHandler(index_path, model_dir, gallery_images, threads, say=log.warning)
            self._stop = threading.Event()
            threading.Thread(target=self._watch, daemon=True, name="follow-current").start()

        def _watch(self):
            while not self._stop.wait(check_every):
                try:
                    self.handler.follower.refresh()
                except Exception as e:  # noqa: BLE001 -- keep following; the old version keeps serving
                    self.handler.follower.say(f"serve: refresh failed: {type(e).__name__}: {e}")

        def check_health(self):
            self.handler.health()

        @api.get("/", response_class=HTMLResponse)
        def page(self):
            return PAGE

        @api.get("/healthz")
        def healthz(self):
            return self.handler.health()

        @api.post("/search")
        async def search(self, request: Request, k: int = 10, rerank: str = "none"):
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                try:
                    form = await request.form()
                except Exception as e:  # noqa: BLE001 -- a malformed form is the client's error
                    raise HTTPException(400, f"unreadable multipart form: {e}".splitlines()[0]) from None
                upload = _first_file(form)
                if upload is None:
                    raise HTTPException(400, "multipart form without a file")
                data = await upload.read()
            else:
                data = await request.body()
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(None, self.handler.answer, data, k, rerank)
            except BadRequest as e:
                raise HTTPException(400, str(e)) from None

        @api.get("/images/{image_id:path}")
        def image(self, image_id: str):
            try:
                data = self.handler.thumbnail(image_id)
            except BadRequest as e:
                raise HTTPException(400, str(e)) from None
            if data is None:
                raise HTTPException(404, f"no picture for image {image_id!r}")
            return Response(content=data, media_type="image/jpeg")

    return SearchService.bind()


def start(index_path: str, host: str = "127.0.0.1", port: int = 8000, **kwargs):
    """Start Serve's HTTP proxy on host:port and deploy the application (Ray must be
    initialised). Returns once the replicas answer."""
    import logging

    from ray import serve

    # Serve sets its own logger up on import: keep its INFO lines out of the terminal unless the
    # job asked for them (pipelines._cli.setup_logging set the root level)
    logging.getLogger("ray.serve").setLevel(logging.getLogger().getEffectiveLevel())
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app(index_path, **kwargs), name=APP_NAME, route_prefix="/", blocking=False)
