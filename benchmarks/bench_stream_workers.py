"""Benchmark: reading a streamed Dataset of image files in worker processes against the probe's own process.

An image folder as users have it: N image files (RGB, `--size` square, PNG or JPEG, written once
into a temporary folder), a map-style Dataset that opens and decodes one with PIL, resizes it to
`--resize` (as an ImageNet-style pipeline does) and turns it into a float tensor, its labels as a
``targets`` attribute. A small CNN; ``gp.Subject(..., stream=True, workers=W)``;
times ``gp.evaluate`` over the whole set and the robustness probe (re-initialization of every
module to epoch 0 and one draw, one pass over the set) for each W, alternating, and checks the
results are identical.

    python benchmarks/bench_stream_workers.py --threads 1 --n 2000 --workers 0 1 2 --repeats 3
    python benchmarks/bench_stream_workers.py --size 224 --format jpg --resize 112 --n 1000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import genprobe as gp


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, folder: Path, labels: list[int], resize: int | None):
        self.files = sorted(folder.glob("*.*"))
        self.targets, self.resize = labels, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            image = image.convert("RGB")
            if self.resize:
                image = image.resize((self.resize, self.resize), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), self.targets[i]


def write_images(folder: Path, n: int, size: int, fmt: str) -> list[int]:
    rng = np.random.default_rng(0)
    labels = [int(i % 10) for i in range(n)]
    for i in range(n):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.{fmt}")
    return labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--format", default="png", choices=["png", "jpg"])
    ap.add_argument("--resize", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        labels = write_images(Path(tmp), a.n, a.size, a.format)
        data = ImageFiles(Path(tmp), labels, a.resize)
        subjects = {w: gp.Subject(model, init=init, test=data, stream=True, workers=w) for w in a.workers}
        times: dict[tuple[str, int], list[float]] = {}
        results = {}
        for _ in range(a.repeats):
            for w, s in subjects.items():
                t = time.perf_counter()
                m = gp.evaluate(s.model, s.final, s.test)
                times.setdefault(("evaluate", w), []).append(time.perf_counter() - t)
                t = time.perf_counter()
                r = gp.robustness(s, split="test", checkpoints=[0], draws=1)
                times.setdefault(("robustness", w), []).append(time.perf_counter() - t)
                results.setdefault(w, (m.loss, r.table))
        base = results[a.workers[0]]
        same = all(results[w][0] == base[0] and results[w][1].equals(base[1]) for w in a.workers)
    print(f"{a.n} {a.format} files {a.size}x{a.size}, resized to {a.resize}, torch threads {a.threads}, "
          f"repeats {a.repeats}; identical results: {same}")
    print("| task | workers | median s (min-max) | vs workers=0 |\n|---|---:|---:|---:|")
    for task in ("evaluate", "robustness"):
        ref = statistics.median(times[(task, a.workers[0])])
        for w in a.workers:
            ts = times[(task, w)]
            med = statistics.median(ts)
            print(f"| {task} | {w} | {med:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
