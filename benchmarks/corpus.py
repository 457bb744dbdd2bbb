"""A reproducible JPEG corpus at ImageNet-like sizes, cut from scikit-image's real photos.

Each image ``i`` is a random crop of one of the photos bundled with ``skimage.data``
(only those that load without a download), resized to 375-640 px wide with an
aspect ratio between 3:4 and 4:3, maybe mirrored, and saved as JPEG at quality
75-95. Everything is drawn from ``numpy.random.default_rng([seed, i])``, so any
image can be made in any process and the corpus is the same on every machine with
the same scikit-image and Pillow.

The corpus lives in a cache directory (``DIR/images/000000.jpg`` ... and
``DIR/corpus.json``) and is reused when ``corpus.json`` names the same seed, image
count and generator version and every file is present.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

_LOG = logging.getLogger(__name__)

#: Bumped whenever the way images are drawn changes, so old caches are not reused.
GENERATOR_VERSION = 1
#: Real photographs in ``skimage.data``, colour first; any that need a download (pooch) are skipped.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "motorcycle_left", "motorcycle_right", "camera", "coins", "moon")
WIDTH_RANGE = (375, 640)
ASPECT_RANGE = (3 / 4, 4 / 3)  # height / width
QUALITY_RANGE = (75, 95)
MANIFEST = "corpus.json"
IMAGES_DIR = "images"

_sources: Dict[str, np.ndarray] = {}  # per-process cache of decoded skimage photos


class CorpusError(Exception):
    """The corpus cannot be made (no usable photos, unwritable directory); the message says why."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A generated corpus on disk.

    Attributes:
        directory: The cache directory.
        image_dir: Where the JPEGs are (``directory/images``).
        paths: Absolute paths of the JPEGs, in index order.
        seed: The seed they were drawn with.
        sources: The ``skimage.data`` photos used.
        reused: True when an existing cache was reused.
        total_bytes: Sum of the JPEG file sizes.
    """

    directory: str
    image_dir: str
    paths: List[str]
    seed: int
    sources: List[str]
    reused: bool
    total_bytes: int

    @property
    def glob(self) -> str:
        return os.path.join(self.image_dir, "*.jpg")


def _load_photo(name: str) -> Optional[np.ndarray]:
    """A photo from skimage.data as uint8 (H, W) or (H, W, 3), or None when it is absent or needs a download."""
    if name in _sources:
        return _sources[name]
    import skimage.data

    loader = getattr(skimage.data, name, None)
    photo = None
    if loader is not None:
        try:
            array = np.asarray(loader())
        except Exception as e:  # pooch missing, no network, removed file: skip this photo
            _LOG.debug("skipping skimage.data.%s: %s", name, e)
        else:
            if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
                photo = array
    _sources[name] = photo
    return photo


def available_photos(names: Sequence[str] = PHOTOS) -> List[str]:
    """The names in ``names`` that load from ``skimage.data`` without a download."""
    return [name for name in names if _load_photo(name) is not None]


def make_image(index: int, seed: int, sources: Sequence[str]) -> bytes:
    """Draws image ``index`` of the corpus and returns its JPEG bytes.

    Args:
        index: Position in the corpus.
        seed: Corpus seed.
        sources: Names of usable ``skimage.data`` photos.
    """
    import io

    from PIL import Image

    rng = np.random.default_rng([seed, index])
    photo = _load_photo(sources[int(rng.integers(len(sources)))])
    width = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    aspect = float(rng.uniform(*ASPECT_RANGE))
    height = int(round(width * aspect))
    src_h, src_w = photo.shape[:2]
    # The largest crop of the wanted aspect that fits, then a random 45-100% of it (by side).
    crop_w = min(src_w, src_h / aspect)
    scale = float(rng.uniform(0.45, 1.0))
    crop_w = max(16.0, crop_w * scale)
    crop_h = crop_w * aspect
    left = float(rng.uniform(0, max(0.0, src_w - crop_w)))
    top = float(rng.uniform(0, max(0.0, src_h - crop_h)))
    image = Image.fromarray(photo)
    image = image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_one(job) -> int:
    index, seed, sources, path = job
    data = make_image(index, seed, sources)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def _file_names(images: int) -> List[str]:
    return [f"{i:06d}.jpg" for i in range(images)]


def _cached(directory: str, images: int, seed: int) -> Optional[dict]:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if (manifest.get("images"), manifest.get("seed"), manifest.get("generator_version")) != \
            (images, seed, GENERATOR_VERSION):
        return None
    image_dir = os.path.join(directory, IMAGES_DIR)
    try:
        present = {name for name in os.listdir(image_dir) if name.endswith(".jpg")}
    except OSError:
        return None
    return manifest if present == set(_file_names(images)) else None


def ensure_corpus(directory: str, images: int, seed: int = 0, processes: Optional[int] = None) -> Corpus:
    """Returns the corpus in ``directory``, making it first unless an identical one is cached there.

    Args:
        directory: Cache directory (created if needed).
        images: Number of JPEGs.
        seed: RNG seed. Default 0.
        processes: Worker processes for generation. Default: one per available core.

    Raises:
        CorpusError: ``images`` < 1, or no photo in ``skimage.data`` loads without a download.
    """
    if images < 1:
        raise CorpusError(f"--images must be >= 1, got {images}")
    image_dir = os.path.join(directory, IMAGES_DIR)
    names = _file_names(images)
    manifest = _cached(directory, images, seed)
    reused = manifest is not None
    if not reused:
        sources = available_photos()
        if not sources:
            raise CorpusError(f"none of skimage.data's photos {list(PHOTOS)} loads here; install scikit-image "
                              f"(pip install -e '.[benchmark]')")
        # A stale or partial cache: start clean so no extra files end up in the glob.
        shutil.rmtree(image_dir, ignore_errors=True)
        manifest_path = os.path.join(directory, MANIFEST)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
        os.makedirs(image_dir, exist_ok=True)
        start = time.monotonic()
        jobs = [(i, seed, sources, os.path.join(image_dir, name)) for i, name in enumerate(names)]
        processes = processes or _cores()
        # fork is fine here: the workers only run numpy and Pillow.
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(processes) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (processes * 8)))
        manifest = {"images": images, "seed": seed, "generator_version": GENERATOR_VERSION, "sources": sources,
                    "bytes": int(sum(sizes)), "width_range": list(WIDTH_RANGE),
                    "aspect_range": [round(a, 4) for a in ASPECT_RANGE], "quality_range": list(QUALITY_RANGE)}
        tmp = manifest_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, manifest_path)
        _LOG.info("corpus: wrote %d JPEGs (%.1f MB) to %s in %.1f s with %d processes", images,
                  manifest["bytes"] / 1e6, image_dir, time.monotonic() - start, processes)
    else:
        _LOG.info("corpus: reusing %d JPEGs in %s (seed %d)", images, image_dir, seed)
    paths = [os.path.abspath(os.path.join(image_dir, name)) for name in names]
    return Corpus(directory=os.path.abspath(directory), image_dir=os.path.abspath(image_dir), paths=paths,
                  seed=seed, sources=list(manifest["sources"]), reused=reused, total_bytes=int(manifest["bytes"]))


def _preprocess_one(path: str) -> np.ndarray:
    from images.pillow_decoder import preprocess_image

    with open(path, "rb") as f:
        return preprocess_image(f.read())


def preprocess_corpus(paths: Sequence[str], processes: Optional[int] = None) -> np.ndarray:
    """Decodes and preprocesses every image exactly as the pipeline does, in parallel.

    Returns:
        uint8 array (N, 224, 224, 3).
    """
    processes = processes or _cores()
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    with ctx.Pool(processes) as pool:
        arrays = pool.map(_preprocess_one, list(paths), chunksize=max(1, len(paths) // (processes * 8)))
    return np.stack(arrays)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
