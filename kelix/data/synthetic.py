"""Synthetic shards of every task type, generated from nothing and deterministic by seed.

* ``ocr``: rendered words on a plain background; the user asks for the text, the assistant reads it.
* ``caption``: simple scenes of coloured shapes with a caption (``segments``: image, then text).
* ``vqa``: the same scenes with a question about colour, shape or count.
* ``t2i``: the caption in the user turn, the image in the assistant turn (the generation target).
* ``interleaved``: text, image, text, image (pretraining ``segments``).
* ``text``: plain text segments (keeps the language model's text ability in the mixture).

Used by the quickstart recipes through ``prepare_data()`` and by the tests.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

TASKS = ("ocr", "caption", "vqa", "t2i", "interleaved", "text")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 20), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (160, 160, 160), "beige": (230, 215, 180)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("kelix", "token", "block", "image", "patch", "code", "river", "stone", "cloud", "light", "paper",
         "green", "seven", "north", "apple", "music", "quiet", "orbit", "pixel", "table", "zebra", "delta")
NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass
class Scene:
    background: str
    shapes: list[tuple[str, str]]  # (color, shape)

    def caption(self) -> str:
        things = [f"{article(c)} {c} {s}" for c, s in self.shapes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed} on {article(self.background)} {self.background} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, n)
    return Scene(rng.choice(list(BACKGROUNDS)), [(rng.choice(list(COLORS)), s) for s in shapes])


def render_scene(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    n = len(scene.shapes)
    for i, (color, shape) in enumerate(scene.shapes):
        # each shape in its own vertical band so shapes never hide each other
        x0, x1 = i * width // n, (i + 1) * width // n
        r = max(4, min(x1 - x0, height) // 3)
        cx, cy = (x0 + x1) // 2 + rng.randint(-r // 4, r // 4), height // 2 + rng.randint(-r // 2, r // 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def render_text(text: str, width: int, height: int, rng: random.Random) -> Image.Image:
    bg = rng.choice([(250, 250, 250), (235, 235, 220), (255, 245, 230)])
    img = Image.new("RGB", (width, height), bg)
    size = max(10, min(height // 2, int(1.6 * width / max(1, len(text)))))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = rng.randint(0, max(0, width - (x1 - x0))) - x0
    y = rng.randint(0, max(0, height - (y1 - y0))) - y0
    draw.text((x, y), text, font=font, fill=rng.choice([(0, 0, 0), (30, 30, 120), (120, 20, 20)]))
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _vqa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["count", "color", "shape"])
    if kind == "count":
        return "How many shapes are in the image?", NUMBERS[len(scene.shapes)]
    color, shape = rng.choice(scene.shapes)
    if kind == "color":
        return f"What color is the {shape}?", color
    return f"Which shape is {color}?", shape


def make_sample(task: str, rng: random.Random, size: tuple[int, int]) -> tuple[dict, list[Image.Image]]:
    """One sample of ``task``: its JSON and the images it names (``0.jpg``, ``1.jpg``...)."""
    w, h = rng.randint(*size), rng.randint(*size)
    img = lambda i: {"type": "image", "image": f"{i}.jpg"}  # noqa: E731
    if task == "ocr":
        text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        msgs = [{"role": "user", "content": [img(0), {"type": "text", "text": "What text is in the image?"}]},
                {"role": "assistant", "content": text}]
        return {"task": "ocr", "messages": msgs}, [render_text(text, max(w, h), min(w, h), rng)]
    scene = random_scene(rng)
    picture = render_scene(scene, w, h, rng)
    if task == "caption":
        return {"task": "caption", "segments": [img(0), {"type": "text", "text": scene.caption()}]}, [picture]
    if task == "vqa":
        q, a = _vqa(scene, rng)
        msgs = [{"role": "user", "content": [img(0), {"type": "text", "text": q}]}, {"role": "assistant", "content": a}]
        return {"task": "vqa", "messages": msgs}, [picture]
    if task == "t2i":
        msgs = [{"role": "user", "content": f"Generate an image of {scene.caption()}."},
                {"role": "assistant", "content": [img(0)]}]
        return {"task": "t2i", "messages": msgs}, [picture]
    if task == "interleaved":
        other = random_scene(rng)
        segs = [{"type": "text", "text": f"Here is {scene.caption()}."}, img(0),
                {"type": "text", "text": f"And next, {other.caption()}."}, img(1)]
        return {"task": "interleaved", "segments": segs}, [picture, render_scene(other, h, w, rng)]
    if task == "text":
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        return {"task": "text", "segments": [{"type": "text", "text": words.capitalize() + "."}]}, []
    raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")


def write_shard(path: str, task: str, count: int, seed: int, size: tuple[int, int]):
    """Write one shard atomically (a half-written shard is never left under its final name)."""
    from webdataset import TarWriter

    rng = random.Random(f"{seed}:{task}:{os.path.basename(path)}")
    tmp = f"{path}.tmp{os.getpid()}"
    with TarWriter(tmp, encoder=False) as sink:
        for i in range(count):
            meta, images = make_sample(task, rng, size)
            record = {"__key__": f"{task}{seed:03d}x{i:06d}", "json": json.dumps(meta).encode()}
            for j, im in enumerate(images):
                record[f"{j}.jpg"] = _jpeg(im)
            sink.write(record)
    os.replace(tmp, path)


@dataclass
class SyntheticData:
    """Synthetic shards for quickstarts and tests, generated once in ``prepare_data()``.

    Args:
        out_dir: where shards go, as ``{out_dir}/{task}-{i:05d}.tar``.
        tasks: which task types to generate (see module docstring).
        shards_per_task: shards per task type.
        samples_per_shard: samples in each shard.
        image_size: ``(min, max)`` side in pixels; each image draws its own width and height, so
            native-resolution code paths see varied aspect ratios.
        seed: everything is a function of the seed.
    """

    out_dir: str = "data/synthetic"
    tasks: list[str] = field(default_factory=lambda: ["ocr", "caption", "vqa", "t2i"])
    shards_per_task: int = 2
    samples_per_shard: int = 64
    image_size: tuple[int, int] = (64, 160)
    seed: int = 0

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown synthetic task(s) {bad}; choose from {', '.join(TASKS)}")

    def paths(self, task: str) -> list[str]:
        return [os.path.join(self.out_dir, f"{task}-{i:05d}.tar") for i in range(self.shards_per_task)]

    def ensure(self) -> list[str]:
        """Generate the missing shards; return every shard path."""
        os.makedirs(self.out_dir, exist_ok=True)
        out = []
        for task in self.tasks:
            for i, path in enumerate(self.paths(task)):
                if not os.path.exists(path):
                    write_shard(path, task, self.samples_per_shard, self.seed * 1000 + i, tuple(self.image_size))
                out.append(path)
        return out
