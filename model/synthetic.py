"""Procedural person-like images in the Market-1501 layout, with a learnable identity.

Every item (person id 1..N) has a fixed appearance drawn from its own random stream: torso,
legs, skin and bag colours, a torso pattern (plain, horizontal or vertical stripes, checks)
and its period, body proportions (height, torso width, torso/leg ratio, head size) and a bag
side. Every image of it adds pose jitter (shift, scale, mirror), a camera's colour cast and
background, lighting and pixel noise. Appearance separates identities; cameras, pose and
noise are the nuisances a model must ignore.

Layout and split (like Market-1501, train and test identities are disjoint):
- items 1..n_train (n_train = round(train_fraction * N), default half) -> bounding_box_train/
- items n_train+1..N are test items: each one's first min(query_per_item, M - 1) images go to
  query/, the rest to bounding_box_test/. An item is seen by 2..C cameras (random per item)
  and its images cycle through them, so a query's first gallery match comes from another
  camera (with C >= 2), as the ReID evaluation rule needs.
- bounding_box_test/ also holds `junk` images of person -1 (bad detections: background with
  at most a fragment of a figure) and `distractors` of person 0000 (whole figures whose
  appearance is fresh for every image, so they match nobody). Default: 2% of the gallery
  each (at least 1 when there are test items).
- names: PPPP_cCsS_FFFFFF_NN.jpg (PPPP at least 4 digits, '-1' for junk; S the sequence,
  FFFFFF the image's number within its person, NN = 01).

Deterministic: an image depends only on (seed, its person, its index), never on the number
of worker processes. Drawing is vectorised numpy over all images of an item; JPEG via PIL.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

import numpy as np

TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "bounding_box_train", "query", "bounding_box_test"
BATCH = 64  # images per junk/distractor random stream (fixed: keeps output worker-independent)
ITEMS_PER_TASK = 64


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. size is (H, W)."""

    items: int = 100
    images_per_item: int = 10
    cameras: int = 6
    size: tuple[int, int] = (64, 32)
    seed: int = 0
    train_fraction: float = 0.5
    query_per_item: int = 1
    junk: int | None = None  # None: 2% of the gallery
    distractors: int | None = None  # None: 2% of the gallery
    jpeg_quality: int = 90

    def validate(self) -> SyntheticConfig:
        if self.items < 1:
            raise ValueError(f"--items must be >= 1, got {self.items}")
        if self.images_per_item < 1:
            raise ValueError(f"--images-per-item must be >= 1, got {self.images_per_item}")
        if self.cameras < 1:
            raise ValueError(f"--cameras must be >= 1, got {self.cameras}")
        h, w = self.size
        if h < 8 or w < 4:
            raise ValueError(f"--size must be at least 8x4, got {h}x{w}")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise ValueError(f"--train-fraction must be in [0, 1], got {self.train_fraction}")
        if self.query_per_item < 0:
            raise ValueError(f"--query-per-item must be >= 0, got {self.query_per_item}")
        for name in ("junk", "distractors"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"--{name} must be >= 0, got {v}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        return self

    @property
    def n_train(self) -> int:
        return round(self.train_fraction * self.items)

    @property
    def queries_per_test_item(self) -> int:
        return min(self.query_per_item, self.images_per_item - 1)

    def extra_counts(self) -> tuple[int, int]:
        """(junk, distractors) image counts."""
        n_test = self.items - self.n_train
        gallery = n_test * (self.images_per_item - self.queries_per_test_item)
        default = max(1, round(0.02 * gallery)) if n_test else 0
        junk = default if self.junk is None else self.junk
        distractors = default if self.distractors is None else self.distractors
        return junk, distractors

    def expected_counts(self) -> dict[str, int]:
        """Images per folder this config writes."""
        n_test = self.items - self.n_train
        q = n_test * self.queries_per_test_item
        junk, distractors = self.extra_counts()
        return {TRAIN_DIR: self.n_train * self.images_per_item, QUERY_DIR: q,
                GALLERY_DIR: n_test * self.images_per_item - q + junk + distractors}


# ---------------------------------------------------------------- appearance and rendering

def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """h, s, v in [0, 1], shape (...) -> RGB float32 (..., 3) in [0, 255]."""
    h6 = (np.asarray(h, np.float32) % 1.0) * 6.0
    s = np.broadcast_to(np.asarray(s, np.float32), h6.shape)
    v = np.broadcast_to(np.asarray(v, np.float32), h6.shape)
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Rows of the standard sector table: which of v, t, p, q is R, G, B in each sector.
    table = np.stack([np.stack(x, -1) for x in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    rgb = np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]
    return rgb.astype(np.float32) * 255.0


def random_appearance(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n appearances: colours (n, 3) float32 0..255 and shape/pattern parameters (n,)."""
    def colour(vmin=0.15):
        return hsv_to_rgb(rng.random(n), rng.uniform(0.0, 1.0, n) ** 0.7, rng.uniform(vmin, 1.0, n))

    return {
        "torso": colour(), "legs": colour(), "pattern_col": colour(), "bag_col": colour(),
        "skin": hsv_to_rgb(rng.uniform(0.02, 0.1, n), rng.uniform(0.2, 0.6, n),
                           rng.uniform(0.35, 0.95, n)),
        "pattern": rng.integers(0, 4, n),  # 0 plain, 1 h-stripes, 2 v-stripes, 3 checks
        "period": rng.uniform(0.06, 0.16, n).astype(np.float32),  # fraction of H
        "height": rng.uniform(0.78, 0.95, n).astype(np.float32),
        "torso_w": rng.uniform(0.22, 0.34, n).astype(np.float32),  # half width / W
        "torso_len": rng.uniform(0.38, 0.55, n).astype(np.float32),
        "head": rng.uniform(0.06, 0.09, n).astype(np.float32),
        "bag": rng.integers(-1, 2, n),  # -1 left, 0 none, 1 right
    }


def camera_params(seed: int, cameras: int) -> dict[str, np.ndarray]:
    """Per camera (index c-1): colour gain (C, 3), offset (C, 3), background colour (C, 3)."""
    rng = np.random.default_rng([seed, 7, cameras])
    return {
        "gain": rng.uniform(0.8, 1.2, (cameras, 3)).astype(np.float32),
        "offset": rng.uniform(-20, 20, (cameras, 3)).astype(np.float32),
        "bg": hsv_to_rgb(rng.random(cameras), rng.uniform(0.0, 0.4, cameras),
                         rng.uniform(0.3, 0.8, cameras)),
    }


def random_jitter(rng: np.random.Generator, n: int, junk: bool = False) -> dict[str, np.ndarray]:
    """Per-image nuisances: shift, scale, mirror, light, noise level, background wobble."""
    shift = 0.45 if junk else 0.07
    return {
        "dx": rng.uniform(-shift, shift, n).astype(np.float32),
        "dy": rng.uniform(-shift * 0.6, shift * 0.6, n).astype(np.float32),
        "scale": rng.uniform(0.9, 1.08, n).astype(np.float32) * (rng.uniform(0.5, 1.6, n)
                                                                  if junk else 1.0),
        "flip": np.where(rng.random(n) < 0.5, -1, 1),
        "light": rng.uniform(-18, 18, n).astype(np.float32),
        "noise": rng.uniform(3, 9, n).astype(np.float32),
        "bg_shift": rng.uniform(-25, 25, (n, 3)).astype(np.float32),
        "bg_phase": rng.uniform(0, 2 * np.pi, n).astype(np.float32),
    }


def render(app: dict, jit: dict, cams: np.ndarray, cam: dict, size: tuple[int, int],
           rng: np.random.Generator, figure: np.ndarray | None = None) -> np.ndarray:
    """Draw B images -> uint8 (B, H, W, 3).

    app/jit: arrays with leading dim B (see random_appearance / random_jitter); cams: (B,)
    camera numbers 1..C; figure: (B,) bool, False draws background only (junk).
    """
    h, w = size
    b = len(cams)
    c = np.asarray(cams) - 1

    def col(x):  # (B,) -> (B, 1, 1)
        return np.asarray(x, np.float32).reshape(b, 1, 1)

    def rgb(x):  # (B, 3) -> (B, 1, 1, 3)
        return np.asarray(x, np.float32).reshape(b, 1, 1, 3)

    yy = (np.arange(h, dtype=np.float32) + 0.5).reshape(1, h, 1)
    xx = (np.arange(w, dtype=np.float32) + 0.5).reshape(1, 1, w)

    # Background: the camera's colour, a vertical gradient and a soft horizontal wave.
    wave = np.sin(xx * (6.0 / w) + col(jit["bg_phase"])) * 12.0 + (yy / h - 0.5) * 30.0
    bg = rgb(cam["bg"][c] + jit["bg_shift"]) + wave[..., None]  # (B, H, W, 3)

    s = col(jit["scale"] * app["height"]) * h  # figure height in pixels
    top = (h - s) / 2 + col(jit["dy"]) * h
    cx = w / 2 + col(jit["dx"]) * w
    head_r = col(app["head"]) * s
    torso_top = top + 2 * head_r
    torso_bot = torso_top + col(app["torso_len"]) * (s - 2 * head_r)
    bottom = top + s
    tw = col(app["torso_w"] * jit["scale"]) * w
    rel = xx - cx
    arel = np.abs(rel)

    head = (rel / (0.8 * head_r)) ** 2 + ((yy - (top + head_r)) / head_r) ** 2 < 1
    torso = (arel < tw) & (yy >= torso_top) & (yy < torso_bot)
    legs = (arel < 0.8 * tw) & (arel > 0.12 * tw) & (yy >= torso_bot) & (yy < bottom)
    side = col(np.asarray(app["bag"]) * np.asarray(jit["flip"]))
    bag_cx = cx + side * (tw + 0.25 * tw)
    bag_cy = torso_top + 0.75 * (torso_bot - torso_top)
    bag = ((side != 0) & (np.abs(xx - bag_cx) < 0.3 * tw)
           & (np.abs(yy - bag_cy) < 0.22 * (torso_bot - torso_top)))

    period = np.maximum(col(app["period"]) * h * col(jit["scale"]), 2.0)
    hs = np.floor((yy - torso_top) / period).astype(np.int64) % 2 == 1
    vs = np.floor((rel * col(jit["flip"]) + 4 * w) / period).astype(np.int64) % 2 == 1
    ptype = col(app["pattern"])
    pattern = ((ptype == 1) & hs) | ((ptype == 2) & vs) | ((ptype == 3) & (hs ^ vs))

    # One region label per pixel, painted back to front, then one palette lookup: far fewer
    # full-size float passes than an np.where per body part.
    label = np.zeros((b, h, w), np.uint8)
    label[legs] = 1
    label[torso & ~pattern] = 2
    label[torso & pattern] = 3
    label[head] = 4
    label[bag] = 5
    if figure is not None:
        label *= col(np.asarray(figure, bool)).astype(np.uint8)
    palette = np.stack([np.zeros((b, 3), np.float32)] + [
        np.asarray(app[k], np.float32) for k in ("legs", "torso", "pattern_col", "skin", "bag_col")
    ], 1)  # (B, 6, 3)
    # Shading across the body makes it look rounded (and the colours less flat).
    shade = np.where(label <= 3, 1.0 - 0.25 * np.minimum(arel / np.maximum(tw, 1.0), 1.0) ** 2,
                     1.0).astype(np.float32)
    flat = np.arange(b, dtype=np.intp).reshape(b, 1, 1) * palette.shape[1] + label
    fig = np.take(palette.reshape(-1, 3), flat, axis=0) * shade[..., None]
    img = np.where((label > 0)[..., None], fig, bg)

    img *= rgb(cam["gain"][c])
    img += rgb(cam["offset"][c]) + col(jit["light"])[..., None] + 0.5
    # Uniform noise with standard deviation jit["noise"]: 5x cheaper to draw than Gaussian.
    noise = rng.random(img.shape, dtype=np.float32) - 0.5
    noise *= col(jit["noise"] * np.float32(12 ** 0.5))[..., None]
    img += noise
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


# ---------------------------------------------------------------- dataset writing

def _name(pid: int, cam: int, frame: int, width: int) -> str:
    p = "-1" if pid < 0 else f"{pid:0{width}d}"
    return f"{p}_c{cam}s{1 + (frame // 50) % 6}_{frame:06d}_01.jpg"


def _save(out_dir: str, folder: str, names: list[str], images: np.ndarray, quality: int) -> None:
    from PIL import Image

    for name, arr in zip(names, images):
        Image.fromarray(arr).save(os.path.join(out_dir, folder, name), "JPEG", quality=quality)


def _item_task(cfg: SyntheticConfig, out_dir: str, first: int, last: int) -> int:
    """Draw and write items first..last (inclusive)."""
    cam = camera_params(cfg.seed, cfg.cameras)
    width = max(4, len(str(cfg.items)))
    m = cfg.images_per_item
    for pid in range(first, last + 1):
        rng = np.random.default_rng([cfg.seed, 1, pid])
        app = {k: np.repeat(v, m, axis=0) for k, v in random_appearance(rng, 1).items()}
        k = int(rng.integers(min(2, cfg.cameras), cfg.cameras + 1))
        seen_by = np.sort(rng.choice(cfg.cameras, size=k, replace=False)) + 1
        cams = seen_by[np.arange(m) % k]
        images = render(app, random_jitter(rng, m), cams, cam, cfg.size, rng)
        names = [_name(pid, int(cams[j]), j, width) for j in range(m)]
        if pid <= cfg.n_train:
            _save(out_dir, TRAIN_DIR, names, images, cfg.jpeg_quality)
        else:
            nq = cfg.queries_per_test_item
            _save(out_dir, QUERY_DIR, names[:nq], images[:nq], cfg.jpeg_quality)
            _save(out_dir, GALLERY_DIR, names[nq:], images[nq:], cfg.jpeg_quality)
    return (last - first + 1) * m


def _extra_task(cfg: SyntheticConfig, out_dir: str, pid: int, batch: int, total: int) -> int:
    """Junk (pid -1) or distractor (pid 0) images batch*BATCH .. within total."""
    cam = camera_params(cfg.seed, cfg.cameras)
    rng = np.random.default_rng([cfg.seed, 2 if pid < 0 else 3, batch])
    n = min(BATCH, total - batch * BATCH)
    cams = rng.integers(1, cfg.cameras + 1, n)
    junk = pid < 0
    figure = rng.random(n) < 0.6 if junk else None  # junk: a fragment or nothing
    images = render(random_appearance(rng, n), random_jitter(rng, n, junk=junk), cams, cam,
                    cfg.size, rng, figure)
    width = max(4, len(str(cfg.items)))
    names = [_name(pid, int(cams[j]), batch * BATCH + j, width) for j in range(n)]
    _save(out_dir, GALLERY_DIR, names, images, cfg.jpeg_quality)
    return n


def _run(task: tuple) -> int:
    kind, args = task[0], task[1:]
    return _item_task(*args) if kind == "items" else _extra_task(*args)


def plan_tasks(cfg: SyntheticConfig, out_dir: str) -> list[tuple]:
    """Independent work units; their outputs do not depend on how they are scheduled."""
    tasks: list[tuple] = []
    for first in range(1, cfg.items + 1, ITEMS_PER_TASK):
        tasks.append(("items", cfg, out_dir, first, min(cfg.items, first + ITEMS_PER_TASK - 1)))
    junk, distractors = cfg.extra_counts()
    for pid, total in ((-1, junk), (0, distractors)):
        for batch in range(-(-total // BATCH)):
            tasks.append(("extra", cfg, out_dir, pid, batch, total))
    return tasks


def write_dataset(cfg: SyntheticConfig, out_dir: str, workers: int = 1,
                  progress=None) -> dict[str, int]:
    """Write the Market-layout dataset into out_dir (created; should be a fresh temp dir).

    Returns images per folder. progress(done_images, total_images) is called per task.
    """
    cfg.validate()
    for d in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    tasks = plan_tasks(cfg, out_dir)
    expected = cfg.expected_counts()
    total, done = sum(expected.values()), 0
    if workers <= 1 or len(tasks) == 1:
        results = map(_run, tasks)
        for n in results:
            done += n
            if progress:
                progress(done, total)
    else:
        # forkserver: workers do not inherit the caller's threads (Arrow, Ray), unlike fork.
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            for n in pool.imap_unordered(_run, tasks):
                done += n
                if progress:
                    progress(done, total)
    return expected
