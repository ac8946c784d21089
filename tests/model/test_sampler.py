"""Identity-balanced sampling from WebDataset shards: index, random access, epoch plan."""
import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from model.sampler import (
    ShardIndexWarning,
    ShardReader,
    eligible_items,
    index_shards,
    iter_plan_rows,
    plan_epoch,
    steps_per_epoch,
)
from model.shards import write_shards


def _write(tmp_path, counts, shard_size=7, ext="jpg"):
    """Shards with items 'p{i}' holding counts[i] images; image bytes encode the image id."""
    rows = []
    for i, n in enumerate(counts):
        for j in range(n):
            iid = f"train/p{i:03d}_c{j % 3}_{j:03d}.{ext}"
            rows.append(({"image_id": iid, "item_id": f"p{i:03d}", "camera_id": j % 3,
                          "split": "train", "path": iid}, f"IMG:{iid}".encode() * (j + 1), ext))
    rows.sort(key=lambda r: r[0]["image_id"])
    return write_shards(rows, str(tmp_path / "shards"), "train", shard_size=shard_size), rows


def test_index_and_read_back_local_and_uri(tmp_path):
    urls, rows = _write(tmp_path, [3, 1, 5, 2])
    assert len(urls) == 2
    for spec in (urls, [f"file://{u}" for u in urls]):  # plain path and pyarrow URI paths
        idx = index_shards(spec)
        assert len(idx) == len(rows)
        reader = ShardReader(idx)
        by_id = {r[0]["image_id"]: r for r in rows}
        for i in range(len(idx)):
            row, data, ext = by_id[idx.image_id[i]]
            assert reader.read(i) == data and idx.ext[i] == ext
            assert idx.item_id[i] == row["item_id"] and idx.camera_id[i] == row["camera_id"]
        reader.close()


def test_truncated_shard_keeps_complete_samples(tmp_path):
    urls, _ = _write(tmp_path, [4, 4], shard_size=100)
    data = Path(urls[0]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    cut = members[5].offset_data + 2  # inside the 3rd sample's image
    Path(urls[0]).write_bytes(data[:cut])
    with pytest.warns(ShardIndexWarning):
        idx = index_shards(urls)
    assert len(idx) == 2
    reader = ShardReader(idx)
    assert reader.read(1).startswith(b"IMG:")


def test_eligible_items_rules():
    ids = ["b", "a", "a", "c", "-1", "-1", "0", "0", "b", "b"]
    items = eligible_items(ids, min_images=2)
    assert list(items) == ["a", "b"]  # c has one image; junk/distractor excluded
    assert items["b"].tolist() == [0, 8, 9]


def _items(counts):
    ids = [f"p{i:03d}" for i, n in enumerate(counts) for _ in range(n)]
    return eligible_items(ids, min_images=2), ids


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_properties(world):
    counts = [6, 4, 1, 3, 8, 2, 5, 4, 4, 7, 2, 9, 4, 1, 3, 6, 5, 4, 4, 3, 10, 2, 4]
    items, ids = _items(counts)
    P, M = 3, 4
    n_items = len(items)  # 21 (two single-image items skipped)
    plans = [plan_epoch(items, P, M, world, r, seed=7, epoch=0) for r in range(world)]
    n_steps = steps_per_epoch(n_items, P, world)
    assert all(len(p) == n_steps for p in plans)
    names = sorted(items)
    seen = set()
    for step in range(n_steps):
        step_items = []
        for r in range(world):
            batch = plans[r][step]
            assert len(batch) == P
            for c, rows in batch:
                n_img = len(items[names[c]])
                assert len(rows) == min(M, n_img)                 # M, or all when fewer
                assert len(set(rows.tolist())) == len(rows)       # no duplicates
                assert {ids[x] for x in rows} == {names[c]}        # all from the item
                step_items.append(c)
        assert len(step_items) == len(set(step_items))  # ranks never share an item in a step
        seen.update(step_items)
    assert seen == set(range(n_items))  # one epoch covers every item
    # deterministic for a seed, different for another epoch
    again = plan_epoch(items, P, M, world, 0, seed=7, epoch=0)
    assert all([c for c, _ in a] == [c for c, _ in b] and all(
        (x[1] == y[1]).all() for x, y in zip(a, b)) for a, b in zip(again, plans[0]))
    other = plan_epoch(items, P, M, world, 0, seed=7, epoch=1)
    assert [[c for c, _ in b] for b in other] != [[c for c, _ in b] for b in plans[0]]


def test_fixed_steps_and_labels():
    items, ids = _items([4] * 10)
    plan = plan_epoch(items, 4, 2, 1, 0, seed=0, epoch=3, steps=12)
    assert len(plan) == 12
    counts = Counter(c for batch in plan for c, _ in batch)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 2
    for rows, labels in iter_plan_rows(plan):
        assert rows.shape == labels.shape == (8,)
        names = sorted(items)
        assert all(ids[r] == names[lab] for r, lab in zip(rows, labels))


def test_too_few_items_is_an_error():
    items, _ = _items([3] * 5)
    with pytest.raises(ValueError, match="need at least"):
        plan_epoch(items, 3, 2, 2, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="rank"):
        plan_epoch(items, 2, 2, 2, 2, seed=0, epoch=0)


def test_plan_is_balanced_over_many_epochs():
    items, _ = _items([5] * 9)
    counts = Counter()
    for e in range(40):
        for batch in plan_epoch(items, 2, 2, 2, 1, seed=1, epoch=e):
            counts.update(c for c, _ in batch)
    freq = np.array([counts[c] for c in range(9)])
    assert freq.min() > 0 and freq.max() / freq.min() < 2
