"""Synthetic shards of every task type, generated from nothing and deterministic by seed.

* ``ocr``: rendered words on a plain background; the user asks for the text, the assistant reads it.
* ``caption``: simple scenes of coloured shapes with a caption (``segments``: image, then text).
* ``vqa``: the same scenes with a question about colour, shape or count.
* ``t2i``: a prompt such as "two blue squares" in the user turn, its picture (one to three objects of one
  colour and shape on a random background, square up to :data:`T2I_ASPECT`) in the assistant turn;
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

TASKS = ("ocr", "caption", "vqa", "t2i", "interleaved", "text", "dense")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 20), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (160, 160, 160), "beige": (230, 215, 180)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("kelix", "token", "block", "image", "patch", "code", "river", "stone", "cloud", "light", "paper",
         "green", "seven", "north", "apple", "music", "quiet", "orbit", "pixel", "table", "zebra", "delta")
NUMBERS = ("zero", "one", "two", "three", "four")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
IMAGE_SIZE = (140, 168)  # (min, max) side: a shape in a scene of three spans about 2x2 merged 28 px patches
OCR_CELL, OCR_FONT = 28, 18  # the token grid OCR text is typeset on, and its glyph size in pixels
OCR_ROWS = 1  # OCR images are one line of cells: the tiny LLM reads left to right instead of searching a page
T2I_ASPECT = 1.25  # t2i pictures: long side / short side at most (LLM gen_image keeps 0.75 to 1.33)


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


def place_shapes(n: int, width: int, height: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """``(cx, cy, r)`` of ``n`` (1-3) shapes: one fills the image, two its halves, three take three of its
    quadrants, so they never overlap and each is as large as its region allows (``r`` = 0.38 of the
    region's short side, the centre jittered inside it): a shape spans several merged patches."""
    if n == 1:
        regions = [(0, 0, width, height)]
    elif n == 2:
        halves = [(0, 0, width // 2, height), (width // 2, 0, width, height)] if width >= height else \
            [(0, 0, width, height // 2), (0, height // 2, width, height)]
        regions = halves
    else:
        quads = [(x, y, x + width // 2, y + height // 2) for y in (0, height // 2) for x in (0, width // 2)]
        regions = sorted(rng.sample(quads, n), key=lambda q: (q[1], q[0]))
    out = []
    for x0, y0, x1, y1 in regions:
        side = min(x1 - x0, y1 - y0)
        r = max(4, int(0.38 * side))
        jx, jy = max(0, (x1 - x0) // 2 - r - 1), max(0, (y1 - y0) // 2 - r - 1)
        out.append(((x0 + x1) // 2 + rng.randint(-jx, jx), (y0 + y1) // 2 + rng.randint(-jy, jy), r))
    return out


def render_scene(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for (color, shape), (cx, cy, r) in zip(scene.shapes, place_shapes(len(scene.shapes), width, height, rng)):
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def render_text(text: str, width: int, height: int, rng: random.Random) -> Image.Image:
    """Words typeset on the tokenizer's 28 px token grid (:data:`OCR_CELL`): each word starts at a cell
    boundary, glyphs of :data:`OCR_FONT` px sit inside one row of cells, so a word gives the same cells
    wherever it stands (the tiny quickstart tokenizer's coarse codes can then tell words apart). The
    image sides are multiples of the cell, so resizing to the pixel budget keeps the grid."""
    # random light paper and dark ink: a one-line image is never repeated, so held-out images stay unseen
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    font = ImageFont.load_default(size=OCR_FONT)
    draw = ImageDraw.Draw(img)
    ink = tuple(rng.randint(0, 110) for _ in range(3))
    words = text.split(" ")
    cells = [-(-int(draw.textlength(w, font=font)) // OCR_CELL) for w in words]
    free = max(0, width // OCR_CELL - sum(cells) - (len(words) - 1))
    col = rng.randint(0, free)
    row = rng.randint(0, max(0, height // OCR_CELL - 1))
    _, top, _, bottom = draw.textbbox((0, 0), "kelixpg", font=font)
    y = row * OCR_CELL + (OCR_CELL - (bottom - top)) // 2 - top
    for w, n in zip(words, cells):
        draw.text((col * OCR_CELL + 2, y), w, font=font, fill=ink)
        col += n + 1  # one empty cell between words
    return img


def t2i_text(color: str, count: int, shape: str) -> str:
    """"a red circle", "two blue squares"."""
    return f"a {color} {shape}" if count == 1 else f"{NUMBERS[count]} {color} {PLURAL[shape]}"


def random_t2i(rng: random.Random) -> tuple[str, int, str, str]:
    """(colour, count, shape, background) of a text-to-image prompt: 1-3 objects of one kind."""
    return rng.choice(list(COLORS)), rng.randint(1, 3), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))


def render_t2i(color: str, count: int, shape: str, width: int, rng: random.Random, background: str = "white",
               height: int | None = None) -> Image.Image:
    """The picture of a t2i prompt, drawn by the scene renderer (square unless ``height`` is given)."""
    return render_scene(Scene(background, [(color, shape)] * count), width, height or width, rng)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _vqa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["count", "color", "shape"])
    if kind == "count":
        return "How many shapes are in the image?", NUMBERS[len(scene.shapes)]
    color, shape = rng.choice(scene.shapes)
    if kind == "color" or _shared(scene, color):  # two red objects: "which shape is red?" has no one answer
        return f"What color is the {shape}?", color
    return f"Which shape is {color}?", shape


def _shared(scene: Scene, color: str) -> bool:
    return sum(c == color for c, _ in scene.shapes) > 1


def _vqa_all(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """The count and one question per object (its colour, or its shape by colour), in random order: one image
    feeds 2 to 4 supervised answers instead of 1. Never both questions of one object: after "What color is
    the circle? red", "Which shape is red?" is answered from the text, and the LLM learns that shortcut
    instead of reading the image."""
    qa = [("How many shapes are in the image?", NUMBERS[len(scene.shapes)])]
    for color, shape in scene.shapes:
        if _shared(scene, color) or rng.random() < 0.5:
            qa.append((f"What color is the {shape}?", color))
        else:
            qa.append((f"Which shape is {color}?", shape))
    rng.shuffle(qa)
    return qa


def make_sample(task: str, rng: random.Random, size: tuple[int, int], turns: str = "all") -> tuple[dict, list[Image.Image]]:
    """One sample of ``task``: its JSON and the images it names (``0.jpg``, ``1.jpg``...). A ``vqa`` sample
    asks every question its scene answers (``turns="all"``, training) or one drawn at random (``"one"``: the
    held-out benchmark's items)."""
    w, h = rng.randint(*size), rng.randint(*size)
    img = lambda i: {"type": "image", "image": f"{i}.jpg"}  # noqa: E731
    if task == "ocr":
        text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        msgs = [{"role": "user", "content": [img(0), {"type": "text", "text": "What text is in the image?"}]},
                {"role": "assistant", "content": text}]
        w, h = OCR_CELL * (max(w, h) // OCR_CELL), OCR_CELL * OCR_ROWS
        return {"task": "ocr", "messages": msgs}, [render_text(text, w, h, rng)]
    if task == "dense":  # dense rendered digits (that module imports this one: imported here, not at the top)
        from kelix.data.synthetic_dense import dense_sample

        return dense_sample(rng, size)
    if task == "t2i":
        color, count, shape, background = random_t2i(rng)
        side = max(w, h)
        picture = render_t2i(color, count, shape, side, rng, background,
                             height=rng.randint(int(side / T2I_ASPECT) + 1, side))
        msgs = [{"role": "user", "content": f"Generate an image of {t2i_text(color, count, shape)}."},
                {"role": "assistant", "content": [img(0)]}]
        return {"task": "t2i", "messages": msgs}, [picture]
    scene = random_scene(rng)
    picture = render_scene(scene, w, h, rng)
    if task == "caption":
        return {"task": "caption", "segments": [img(0), {"type": "text", "text": scene.caption()}]}, [picture]
    if task == "vqa":
        qa = [_vqa(scene, rng)] if turns == "one" else _vqa_all(scene, rng)
        msgs = []
        for i, (q, a) in enumerate(qa):  # the image comes with the first question only
            msgs += [{"role": "user", "content": [img(0), {"type": "text", "text": q}] if i == 0 else q},
                     {"role": "assistant", "content": a}]
        return {"task": "vqa", "messages": msgs}, [picture]
    if task == "interleaved":
        other = random_scene(rng)
        segs = [{"type": "text", "text": f"Here is {scene.caption()}."}, img(0),
                {"type": "text", "text": f"And next, {other.caption()}."}, img(1)]
        return {"task": "interleaved", "segments": segs}, [picture, render_scene(other, h, w, rng)]
    if task == "text":
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        return {"task": "text", "segments": [{"type": "text", "text": words.capitalize() + "."}]}, []
    raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")


def world_sentences() -> list[str]:
    """Every sentence template of the world filled with every word it can hold, each word at least once
    at a sentence start and once after a space (what ``builtin:synthetic`` learns its merges from)."""
    rng = random.Random(0)
    out = ["What text is in the image?", "How many shapes are in the image?", "user\n", "assistant\n", "system\n"]
    words = [*COLORS, *BACKGROUNDS, *SHAPES, *PLURAL.values(), *NUMBERS, *WORDS]
    out += [f"{w.capitalize()} {w} {w.capitalize()}." for w in words] + [f"{w} {w}" for w in words]
    for color in COLORS:
        for shape in SHAPES:
            out += [f"What color is the {shape}?", f"Which shape is {color}?"]
            out += [f"Generate an image of {t2i_text(color, n, shape)}." for n in (1, 2, 3)]
    for _ in range(200):
        scene, other = random_scene(rng), random_scene(rng)
        out += [scene.caption(), f"Here is {scene.caption()}.", f"And next, {other.caption()}."]
    return out


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
    image_size: tuple[int, int] = IMAGE_SIZE
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
