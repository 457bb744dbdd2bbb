"""The one-command demo: real photos plus broken files, scored on the DirectRunner.

    python -m pipelines.demo --output demo_output     (what `make demo` runs)

Writes sample images from scikit-image's ``skimage.data`` (in several image modes
and formats) and a set of broken inputs into ``--images`` (default ``demo_images``),
lists them all (plus one path that does not exist) in a manifest, scores the manifest
with ``pipelines.classify_images`` on the prepared EfficientNet-Lite0, and prints
the top predictions, the dead letters and the throughput.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import List

import numpy as np
from PIL import Image

from pipelines.partitions import committed_files, committed_rows, committed_stats

# (file name, skimage.data function, how to save it): every common mode the pipeline converts.
PHOTOS = [
    ("chelsea.jpg", "chelsea", "RGB JPEG"),
    ("coffee.jpg", "coffee", "RGB JPEG"),
    ("astronaut.png", "astronaut", "RGB PNG"),
    ("rocket.webp", "rocket", "RGB WebP"),
    ("camera_gray.png", "camera", "L (grayscale) PNG"),
    ("chelsea_rgba.png", "chelsea", "RGBA PNG"),
    ("coffee_palette.gif", "coffee", "P (palette) GIF"),
    ("chelsea_cmyk.jpg", "chelsea", "CMYK JPEG"),
    ("camera_16bit.png", "camera", "I;16 PNG"),
    ("coffee_rotated_exif.jpg", "coffee", "JPEG stored sideways with EXIF orientation 6"),
    ("chelsea_la.png", "chelsea", "LA (grayscale + alpha) PNG"),
]


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def write_photos(directory: str) -> List[str]:
    """Writes the sample photos; returns their paths."""
    paths = []
    for file_name, source, kind in PHOTOS:
        image = Image.fromarray(_photo(source))
        path = os.path.join(directory, file_name)
        if kind.startswith("RGBA"):
            rgba = image.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(image.size).point(lambda v: 128 + v // 2))
            rgba.save(path)
        elif kind.startswith("P "):
            image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
        elif kind.startswith("CMYK"):
            image.convert("CMYK").save(path, quality=92)
        elif kind.startswith("I;16"):
            gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
            Image.fromarray(gray).save(path)  # uint16 -> mode I;16
        elif kind.startswith("LA"):
            la = image.convert("LA")
            la.putalpha(200)
            la.save(path)
        elif "EXIF" in kind:
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90 CW to display
            image.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif.tobytes())
        elif file_name.endswith(".webp"):
            image.save(path, quality=90)
        else:
            image.save(path, quality=92) if file_name.endswith(".jpg") else image.save(path)
        paths.append(path)
    return paths


def write_broken(directory: str) -> List[str]:
    """Writes inputs that must end as dead letters; returns their paths (plus one missing path)."""
    good = io.BytesIO()
    Image.fromarray(_photo("coffee")).save(good, format="JPEG", quality=90)
    data = good.getvalue()
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 Mpx in a few kB
    files = {
        "empty.jpg": b"",
        "truncated.jpg": data[: len(data) // 3],
        "notes_named_like_a_photo.jpg": b"This is a text file, not a JPEG.\n",
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n',
        "decompression_bomb.png": bomb.getvalue(),
    }
    paths = []
    for name, content in files.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(content)
        paths.append(path)
    paths.append(os.path.join(directory, "does_not_exist.jpg"))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="Output directory. Default: demo_output.")
    parser.add_argument("--images", default="demo_images", help="Where sample images go. Default: demo_images.")
    args, beam_args = parser.parse_known_args(argv)
    os.makedirs(args.images, exist_ok=True)
    inputs = write_photos(args.images) + write_broken(args.images)
    manifest = os.path.join(args.images, "manifest.txt")
    with open(manifest, "w") as f:
        f.write("# sample photos and broken files written by pipelines.demo\n")
        f.write("\n".join(os.path.abspath(p) for p in inputs) + "\n")

    from pipelines.classify_images import main as classify

    code = classify(["--input", manifest, "--output", args.output, "--top_k", "3"] + beam_args)
    if code:
        return code
    predictions = committed_rows(args.output, "predictions", missing_ok=True)
    dead = committed_rows(args.output, "dead_letter", missing_ok=True)
    stats = committed_stats(args.output)
    print(f"\nTop predictions ({len(predictions)} images):")
    for row in sorted(predictions, key=lambda r: r["uri"]):
        best = ", ".join(f"{p['label']} {p['score']:.2f}" for p in row["top_k"])
        print(f"  {os.path.basename(row['uri']):28s} {best}")
    print(f"\nDead letters ({len(dead)}):")
    for row in sorted(dead, key=lambda r: r["uri"]):
        print(f"  {os.path.basename(row['uri']):28s} [{row['stage']}] {row['error']}")
    lat = stats["batch_latency_seconds"]
    print(f"\nThroughput: {stats['images_per_second']} images/s over {stats['wall_seconds']} s wall "
          f"({stats['engine']['engine']}, batch p50 {lat['p50'] * 1e3:.1f} ms). "
          f"Inputs {len(inputs)} = predictions {len(predictions)} + dead letters {len(dead)}: "
          f"{'OK' if len(inputs) == len(predictions) + len(dead) else 'MISMATCH'}")
    print(f"Stats: {committed_files(args.output, 'stats')[0]} and stats.png beside it")
    return 0 if len(inputs) == len(predictions) + len(dead) else 1


if __name__ == "__main__":
    sys.exit(main())
