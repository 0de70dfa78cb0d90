"""``dataset=shapes``: seeded synthetic images of coloured shapes, generated in memory, with
questions whose answers depend on the image only (the question text of a kind is the same for
every image). Kinds: ``colour`` and ``shape`` (multiple choice, answered by option letter),
``count`` and ``position`` (short answers, exact match). Records are LLaVA conversation records
whose ``image`` is the PIL image itself."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = 240
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _options(values) -> str:
    return "\n".join(f"{'ABCDE'[i]}. {value}" for i, value in enumerate(values))


QUESTIONS = {
    "colour": f"What colour is the shape?\n{_options(COLOURS)}\n{LETTER_INSTRUCTION}",
    "shape": f"Which shape is in the image?\n{_options(SHAPES)}\n{LETTER_INSTRUCTION}",
    "count": "How many shapes are there? Answer with a number.",
    "position": "Is the shape on the left or on the right? Answer with one word.",
}
ANSWER_KINDS = {"colour": "letter", "shape": "letter", "count": "exact", "position": "exact"}
VOCABULARY = [*COLOURS, *SHAPES, "left", "right", "1", "2", "3", *QUESTIONS.values()]


def _mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return (abs(x - cx) <= radius) & (abs(y - cy) <= radius)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    top, bottom = cy - radius, cy + radius  # an upright triangle: wider towards the bottom
    half_width = (y - top) / (2 * radius) * radius
    return (y >= top) & (y <= bottom) & (abs(x - cx) <= half_width)


def draw(items: list[tuple[str, str, float, float]], size: int, radius: float) -> Image.Image:
    """An RGB image with each (shape, colour, cx, cy) drawn on a light background."""
    pixels = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    for shape, colour, cx, cy in items:
        pixels[_mask(shape, size, cx, cy, radius)] = COLOURS[colour]
    return Image.fromarray(pixels)


def shapes_example(kind: str, rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One image and its answer for a question kind."""
    radius = size / 6
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if kind == "count":
        count = rng.randint(1, 3)
        slots = rng.sample([(x, y) for x in (1, 3, 5) for y in (1.5, 4.5)], count)
        items = [(shape, colour, x * size / 6, y * size / 6) for x, y in slots]
        return draw(items, size, radius * 0.7), str(count)
    side = rng.choice(("left", "right"))
    cx = size * (0.25 if side == "left" else 0.75) + rng.uniform(-1, 1)
    image = draw([(shape, colour, cx, size / 2 + rng.uniform(-size / 8, size / 8))], size, radius)
    if kind == "colour":
        return image, "ABCD"[list(COLOURS).index(colour)]
    if kind == "shape":
        return image, "ABC"[SHAPES.index(shape)]
    return image, side


def shapes_records(num: int, kinds: list[str], size: int, seed: int, split: str) -> list[dict]:
    """``num`` records cycling through ``kinds``, seeded by (seed, split)."""
    unknown = [k for k in kinds if k not in QUESTIONS]
    if unknown or not kinds:
        raise ValueError(f"dataset.shapes.questions={list(kinds)}: unknown kind(s) {unknown} "
                         f"(known: {list(QUESTIONS)})")
    rng = random.Random(f"{seed}-{split}")
    records = []
    for index in range(num):
        kind = kinds[index % len(kinds)]
        image, answer = shapes_example(kind, rng, size)
        records.append({"id": f"shapes-{split}-{index}", "image": image, "kind": ANSWER_KINDS[kind],
                        "answer": answer, "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"},
                                                            {"from": "gpt", "value": answer}]})
    return records
