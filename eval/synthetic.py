"""Synthetic visual QA: coloured shapes on cluttered, textured backgrounds, with object masks and benchmark files.

    python -m eval.synthetic --out playground/data/synthetic/test --split test --num-images 200 --seed 1

Why: with no real weights or data, this is the one place where the paper's claim can be checked end to end. The
objects are few, saturated and small (each about 2-6 % of the image); the background is desaturated texture and
grey clutter, so the tokens that matter are a small known set (the object masks) and a pruning rule can be judged
by whether it keeps them.

Written under ``--out`` (all deterministic from ``--seed``):

- ``images/<split>_NNNNN.png`` (336 x 336 RGB) and ``masks/<split>_NNNNN.png`` (uint8, 0 = background, i = object i
  of the annotation), ``annotations.json`` (objects per image: category, colour, shape, bbox, pixel area);
- POPE: ``llava_pope_test.jsonl`` + ``coco/coco_pope_{random,popular,adversarial}.json`` (the official layout; for
  every image, its present objects as "yes" questions and as many absent ones as "no", sampled uniformly, by
  frequency in the split, or among objects sharing a colour or shape with a present one);
- MME-style yes/no pairs: ``llava_mme.jsonl`` + ``mme/{color,count,position}/<image>.txt`` (question<TAB>Yes|No);
- ScienceQA-style multiple choice: ``llava_sqa.jsonl`` + ``scienceqa/problems.json`` + ``pid_splits.json``;
- ``train.json`` (upstream's training format), up to four records per image: its POPE-style questions as one multi-turn
  conversation (every present object once, as many distinct absent ones: balanced yes/no), its MME-style and
  ScienceQA-style questions as another (kept apart so no answer can be read off an earlier turn about the same
  objects), and a caption ("What objects are in the image?" -> "red circle, blue square.": the alignment signal,
  LLaVA's pretraining captions in miniature), and short-answer questions about unique objects ("What colour is the
  circle?"); a record's id is ``<image stem>-<kind>`` (``record_kind``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
OBJECT_SIDE = (52, 84)  # px, inclusive: 4-6 patches of 14 px across
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (230, 200, 25),
}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
POPE_CATEGORIES = ("random", "popular", "adversarial")
SHORT = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."
SQA_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTIONS = "ABCD"
CAPTION_QUESTION = "What objects are in the image?"


@dataclass
class SyntheticObject:
    category: str
    colour: str
    shape: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    area: int  # pixels of the mask

    @property
    def centre_x(self) -> float:
        return (self.bbox[0] + self.bbox[2]) / 2


@dataclass
class SyntheticImage:
    name: str
    objects: list[SyntheticObject]
    image: Image.Image
    mask: np.ndarray  # [H, W] uint8, 0 = background, i = objects[i - 1]


# ---- drawing --------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator) -> np.ndarray:
    """Desaturated texture: a grey-brown tone, low-frequency blotches, grain, stripes, grey clutter shapes."""
    size = IMAGE_SIZE
    tone = rng.uniform(90, 170) + rng.uniform(-12, 12, size=3)
    low = rng.normal(0, 28, size=(7, 7))
    blotches = np.asarray(Image.fromarray(low.astype(np.float32)).resize((size, size), Image.BILINEAR))
    image = tone[None, None, :] + blotches[:, :, None] + rng.normal(0, 10, size=(size, size, 1))
    if rng.random() < 0.6:  # stripes
        period, angle = rng.uniform(10, 30), rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:size, 0:size]
        image += 14 * np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)[:, :, None]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(15, 35))):  # clutter: grey lines, blobs and boxes, low saturation
        grey = int(rng.uniform(40, 220))
        colour = tuple(int(np.clip(grey + rng.uniform(-15, 15), 0, 255)) for _ in range(3))
        x0, y0 = rng.uniform(0, size, size=2)
        x1, y1 = x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            box = [min(x0, x1), min(y0, y1), min(x0, x1) + rng.uniform(4, 24), min(y0, y1) + rng.uniform(4, 24)]
            (draw.ellipse if kind == 1 else draw.rectangle)(box, fill=colour)
    return np.asarray(canvas).copy()


def _shape_mask(shape: str, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    return mask


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """A square box of OBJECT_SIDE px that keeps 8 px away from the boxes already placed (None after 50 tries)."""
    for _ in range(50):
        side = int(rng.integers(OBJECT_SIDE[0], OBJECT_SIDE[1] + 1))
        x0, y0 = (int(v) for v in rng.integers(4, IMAGE_SIZE - side - 4, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[0] >= b[2] + 8 or b[0] >= box[2] + 8 or box[1] >= b[3] + 8 or b[1] >= box[3] + 8 for b in taken):
            return box
    return None


def draw_image(rng: np.random.Generator, name: str) -> SyntheticImage:
    """1-4 objects of distinct categories on a fresh background."""
    pixels = _background(rng)
    count = int(rng.integers(1, 5))
    categories = [CATEGORIES[i] for i in rng.choice(len(CATEGORIES), size=count, replace=False)]
    label = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    objects: list[SyntheticObject] = []
    for category in categories:
        box = _place(rng, [o.bbox for o in objects])
        if box is None:
            continue
        colour, shape = category.split(" ")
        inside = np.asarray(_shape_mask(shape, box)) > 0
        jitter = rng.uniform(-12, 12, size=3)
        shade = rng.normal(0, 6, size=(int(inside.sum()), 1))
        pixels[inside] = np.clip(np.array(COLOURS[colour]) + jitter + shade, 0, 255).astype(np.uint8)
        label[inside] = len(objects) + 1
        objects.append(SyntheticObject(category, colour, shape, box, int(inside.sum())))
    return SyntheticImage(name, objects, Image.fromarray(pixels, "RGB"), label)


# ---- questions ------------------------------------------------------------------------------------------------
def pope_question(category: str) -> str:
    return f"Is there a {category} in the image?"


def pope_negatives(
    rng: np.random.Generator, present: list[str], rule: str, frequency: Counter, count: int
) -> list[str]:
    """Absent objects for one image: uniform (random), most frequent in the split (popular), or sharing a colour or
    shape with a present object, most frequent first (adversarial: the synthetic analogue of POPE's co-occurrence)."""
    absent = [c for c in CATEGORIES if c not in present]
    if rule == "random":
        order = [absent[i] for i in rng.permutation(len(absent))]
    elif rule == "popular":
        order = sorted(absent, key=lambda c: (-frequency[c], CATEGORIES.index(c)))
    elif rule == "adversarial":
        words = {w for c in present for w in c.split(" ")}
        near = [c for c in absent if words & set(c.split(" "))]
        far = [c for c in absent if c not in near]
        order = sorted(near, key=lambda c: (-frequency[c], CATEGORIES.index(c))) + far
    else:
        raise ValueError(f"unknown POPE sampling rule {rule!r}; choose one of {', '.join(POPE_CATEGORIES)}")
    return order[:count]


def mme_pairs(rng: np.random.Generator, objects: list[SyntheticObject]) -> list[tuple[str, str, str]]:
    """(subtask, question, Yes|No) pairs as MME asks them: one true and one false statement per subtask."""
    pairs: list[tuple[str, str, str]] = []
    shapes = Counter(o.shape for o in objects)
    unique = [o for o in objects if shapes[o.shape] == 1]
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        wrong = [c for c in COLOURS if c != obj.colour][int(rng.integers(len(COLOURS) - 1))]
        pairs += [
            ("color", f"Is the {obj.shape} {obj.colour}?", "Yes"),
            ("color", f"Is the {obj.shape} {wrong}?", "No"),
        ]
    count = len(objects)
    other = [k for k in range(1, 5) if k != count][int(rng.integers(3))]
    pairs += [
        ("count", f"Are there {count} objects in the image?", "Yes"),
        ("count", f"Are there {other} objects in the image?", "No"),
    ]
    apart = [(a, b) for a in objects for b in objects if b.centre_x - a.centre_x >= 40]
    if apart:
        left, right = apart[int(rng.integers(len(apart)))]
        pairs += [
            ("position", f"Is the {left.category} to the left of the {right.category}?", "Yes"),
            ("position", f"Is the {right.category} to the left of the {left.category}?", "No"),
        ]
    return pairs


def vqa_turns(objects: list[SyntheticObject]) -> list[tuple[str, str]]:
    """Short-answer questions (VQAv2 style) that read one attribute of a unique object: the colour of the only
    circle, the shape of the only red object. Training data only: they give the answer a word to copy from the
    asked object's patches, which is how a small LLM from scratch learns to find an object before it learns the
    yes/no of POPE (docs/demo.md)."""
    shapes = Counter(o.shape for o in objects)
    colours = Counter(o.colour for o in objects)
    turns = [(f"What colour is the {o.shape}?\n{SHORT}", o.colour) for o in objects if shapes[o.shape] == 1]
    turns += [(f"What shape is the {o.colour} object?\n{SHORT}", o.shape) for o in objects if colours[o.colour] == 1]
    return turns


def sqa_problem(rng: np.random.Generator, objects: list[SyntheticObject]) -> tuple[str, list[str], int]:
    """(question, choices, answer index): which object is shown, with three absent distractors."""
    present = {o.category for o in objects}
    target = objects[int(rng.integers(len(objects)))].category
    absent = [c for c in CATEGORIES if c not in present]
    choices = [target] + [absent[i] for i in rng.choice(len(absent), size=3, replace=False)]
    order = rng.permutation(4)
    choices = [choices[i] for i in order]
    return "Which of these objects is in the image?", choices, choices.index(target)


def sqa_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{OPTIONS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{SQA_SUFFIX}"


# ---- the data set ---------------------------------------------------------------------------------------------
def generate(out: str | Path, num_images: int, seed: int, split: str = "test") -> dict[str, Any]:
    """Write images, masks and every question file under ``out``; returns counts. Same seed, same bytes."""
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    out = Path(out)
    for sub in ("images", "masks", "coco", "scienceqa"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for index in range(num_images):
        item = draw_image(rng, f"{split}_{index:05d}.png")
        item.image.save(out / "images" / item.name)
        Image.fromarray(item.mask, "L").save(out / "masks" / item.name)
        images.append(item)
    frequency = Counter(o.category for item in images for o in item.objects)
    annotations = {item.name: [asdict(o) for o in item.objects] for item in images}
    _write_json(out / "annotations.json", {"categories": list(CATEGORIES), "images": annotations})

    pope_lines, labels, mme_lines, sqa_lines, problems, train = [], {c: [] for c in POPE_CATEGORIES}, [], [], {}, []
    mme_truth: dict[tuple[str, str], list[str]] = {}
    qid = 0
    order_rng = np.random.default_rng([seed, 1])  # its own stream: the evaluation files do not depend on it
    for item in images:
        present = [o.category for o in item.objects]
        negatives_seen: list[str] = []
        for rule in POPE_CATEGORIES:
            negatives = pope_negatives(rng, present, rule, frequency, len(present))
            for category, label in [(c, "yes") for c in present] + [(c, "no") for c in negatives]:
                qid += 1
                text = pope_question(category)
                pope_lines.append(
                    {"question_id": qid, "image": item.name, "text": f"{text}\n{SHORT}", "category": rule}
                )
                labels[rule].append({"question_id": qid, "image": item.name, "text": text, "label": label})
            negatives_seen += [c for c in negatives if c not in negatives_seen]
        pope_turns = [(f"{pope_question(c)}\n{SHORT}", "Yes") for c in present]
        pope_turns += [(f"{pope_question(c)}\n{SHORT}", "No") for c in negatives_seen[: len(present)]]
        turns: list[tuple[str, str]] = []
        for subtask, question, answer in mme_pairs(rng, item.objects):
            mme_lines.append(
                {
                    "question_id": f"{subtask}/{item.name}",
                    "image": item.name,
                    "text": f"{question}\n{SHORT}",
                    "category": subtask,
                }
            )
            mme_truth.setdefault((subtask, item.name), []).append(f"{question} {MME_SUFFIX}\t{answer}")
            turns.append((f"{question}\n{SHORT}", answer))
        question, choices, answer = sqa_problem(rng, item.objects)
        pid = f"{split}_{len(problems):05d}"
        problems[pid] = {
            "question": question,
            "choices": choices,
            "answer": answer,
            "hint": "",
            "image": item.name,
            "split": split,
            "subject": "synthetic shapes",
            "grade": "grade1",
            "topic": "shapes",
        }
        sqa_lines.append({"question_id": pid, "image": item.name, "text": sqa_prompt(question, choices)})
        turns.append((sqa_prompt(question, choices), OPTIONS[answer]))
        train.append(_conversation(rng, item.name, pope_turns, "pope"))
        train.append(_conversation(rng, item.name, turns, "mme-sqa"))
        train.append(_conversation(rng, item.name, [(CAPTION_QUESTION, caption(present))], "caption"))
        if vqa := vqa_turns(item.objects):
            train.append(_conversation(order_rng, item.name, vqa, "vqa"))

    _write_jsonl(out / "llava_pope_test.jsonl", pope_lines)
    for rule, rows in labels.items():
        _write_jsonl(out / "coco" / f"coco_pope_{rule}.json", rows)
    _write_jsonl(out / "llava_mme.jsonl", mme_lines)
    for (subtask, name), lines in mme_truth.items():
        folder = out / "mme" / subtask
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_jsonl(out / "llava_sqa.jsonl", sqa_lines)
    _write_json(out / "scienceqa" / "problems.json", problems)
    _write_json(out / "scienceqa" / "pid_splits.json", {split: list(problems)})
    _write_json(out / "train.json", train)
    objects = [o for item in images for o in item.objects]
    return {
        "images": num_images,
        "objects": len(objects),
        "object_fraction": sum(o.area for o in objects) / (num_images * IMAGE_SIZE**2),
        "pope": len(pope_lines),
        "mme": len(mme_lines),
        "sqa": len(sqa_lines),
    }


def caption(categories: list[str]) -> str:
    """The objects in CATEGORIES order: 'red circle, blue square.'"""
    return ", ".join(sorted(categories, key=CATEGORIES.index)) + "."


def _conversation(rng: np.random.Generator, image: str, turns: list[tuple[str, str]], kind: str) -> dict[str, Any]:
    """One image, its questions in random order; the image tag goes with the first question."""
    order = rng.permutation(len(turns))
    conversations = []
    for position, index in enumerate(order):
        question, answer = turns[index]
        human = f"<image>\n{question}" if position == 0 else question
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return {"id": f"{Path(image).stem}-{kind}", "image": image, "conversations": conversations}


def record_kind(record: dict[str, Any]) -> str:
    """The kind of a train.json record ("pope", "mme-sqa", "caption", "vqa"): its id minus the image stem."""
    return record["id"].removeprefix(f"{Path(record['image']).stem}-")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (images/, masks/, question files)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", help="prefix of the image names (train, test)")
    args = parser.parse_args(argv)
    try:
        counts = generate(args.out, args.num_images, args.seed, args.split)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
