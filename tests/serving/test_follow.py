"""serving.follow / serving.app.SearchHandler without Ray: answers, refusals, following CURRENT."""
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.serving.serving_data import jpeg, make_gallery


@pytest.fixture
def gallery(tmp_path):
    return make_gallery(str(tmp_path))


def rebuild(g, publish=True):
    from index.ann.build import BuildConfig, build_index

    return build_index(g.embeddings, g.index_root, g.name, BuildConfig(index_type="flat", eval_queries=4),
                       publish=publish, progress=lambda m: None, model_dir=g.model_dir).version


def test_handler_answers_and_refuses(gallery):
    from serving.app import BadRequest, SearchHandler

    h = SearchHandler(gallery.index, gallery_images=gallery.root, say=lambda m: None)
    try:
        body = h.answer(Path(gallery.root, "item1/0.jpg").read_bytes(), k=3)
        assert body["index"] == "g" and body["model"] == h.follower.engine.model_id
        assert [r["rank"] for r in body["results"]] == [0, 1, 2]
        assert body["results"][0]["image_id"] == "item1/0.jpg" and body["results"][0]["item_id"] == "2"
        json.dumps(body)  # plain JSON types
        with pytest.raises(BadRequest, match="undecodable image"):
            h.answer(b"GIF89a broken", k=3)
        with pytest.raises(BadRequest, match="k must be"):
            h.answer(jpeg(1), k=0)
        with pytest.raises(BadRequest, match="not offered"):
            h.answer(jpeg(1), k=3, rerank="dba")
        assert h.answer(jpeg(1), k=3, rerank="aqe")["results"]
        assert h.thumbnail("item1/0.jpg")[:2] == b"\xff\xd8"
        with pytest.raises(BadRequest, match="not in the index"):
            h.thumbnail("../model/config.json")
        with pytest.raises(BadRequest, match="not in the index"):
            h.thumbnail("/etc/passwd")
    finally:
        h.follower.close()


def test_follower_swaps_to_a_verified_version_and_never_loads_a_tampered_one(gallery):
    from index.ann.versions import IndexHome
    from serving.follow import CurrentFollower

    said = []
    f = CurrentFollower(gallery.index, say=said.append, grace_s=0)
    try:
        v1 = f.engine.version
        assert f.refresh() is False
        held = f.engine
        v2 = rebuild(gallery)
        assert f.refresh() is True and f.engine.version == v2
        assert held.search_vectors(held.embed([jpeg(3)]).embeddings, 2).valid.all()  # old engine still answers
        # a published version whose shard changed after the build: refused, v2 keeps serving
        v3 = rebuild(gallery, publish=False)
        home = IndexHome(gallery.index)
        shard = os.path.join(home.version_dir(v3), "shard-000.faiss")
        with open(shard, "r+b") as fh:
            fh.seek(os.path.getsize(shard) - 8)
            fh.write(b"\x00" * 8)
        home.publish(v3)
        assert f.refresh() is False and f.engine.version == v2 and v3 in f.refused
        assert "sha256" in f.refused[v3] and any("not loading version" in m for m in said)
        assert f.refresh() is False  # not retried
        home.publish(v1)  # a rollback is followed too
        assert f.refresh() is True and f.engine.version == v1
        shutil.rmtree(home.version_dir(v3))
    finally:
        f.close()
