"""A small world of coloured shapes where the truth of every image is known.

Each image is a 112 x 112 canvas split into a 2 x 2 grid; each cell holds at most one object with a shape, a
colour, a size and a position (the cell, jittered inside it). The reference description names every object in
reading order, one sentence each::

    There is a large red circle at the top left. There is a small blue square at the bottom right.

The language is closed: every sentence a model writes can be parsed back into (size, colour, shape, position)
and checked against the ground truth (`capdpo.synthetic.scoring`).

Biased captions model the co-occurrence hallucinations of real captioners: a `BiasRule` says that in images
containing a `trigger` shape (and no `substitute`), each other object is named `substitute` with probability `p`.
A model trained on such captions learns to "see" the substitute next to the trigger.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # reading order of the 2 x 2 cells
IMAGE_SIZE = 112
BACKGROUND = (232, 232, 228)
SENTENCE = "There is a {size} {colour} {shape} at the {position}."
DESCRIBE_PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and which cell it is in (`box` is its pixel bounding box)."""

    shape: str
    colour: str
    size: str
    position: str
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def sentence(self, shape: str | None = None) -> str:
        """The reference sentence for this object (optionally naming another shape)."""
        return SENTENCE.format(size=self.size, colour=self.colour, shape=shape or self.shape, position=self.position)


@dataclass
class Scene:
    """The ground truth of one image: its objects in reading order."""

    objects: list[SceneObject]
    jitter_seed: int = 0

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def at(self, position: str) -> SceneObject | None:
        return next((o for o in self.objects if o.position == position), None)

    def description(self) -> str:
        """The reference description: one sentence per object, in reading order."""
        return " ".join(o.sentence() for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "jitter_seed": self.jitter_seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        objects = [SceneObject(**{**o, "box": tuple(o.get("box", (0, 0, 0, 0)))}) for o in data["objects"]]
        return cls(objects=objects, jitter_seed=data.get("jitter_seed", 0))


@dataclass(frozen=True)
class BiasRule:
    """In an image with `trigger` and without `substitute`, every other object is named `substitute` w.p. `p`."""

    trigger: str
    substitute: str
    p: float

    def applies_to(self, scene: Scene, obj: SceneObject) -> bool:
        return (
            self.trigger in scene.shapes
            and self.substitute not in scene.shapes
            and obj.shape not in (self.trigger, self.substitute)
        )


@dataclass
class WorldConfig:
    """How scenes are drawn: object counts and shape frequencies (the true world's co-occurrence statistics)."""

    min_objects: int = 1
    max_objects: int = 3
    # Circles are common, so the circle -> triangle bias touches many images.
    shape_weights: dict[str, float] = field(
        default_factory=lambda: {"circle": 2.0, "square": 1.0, "triangle": 1.0, "cross": 1.0, "star": 1.0}
    )

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"objects per image must satisfy 1 <= min <= max <= {len(POSITIONS)}")


DEFAULT_BIAS = (BiasRule(trigger="circle", substitute="triangle", p=0.6),)


def sample_scene(rng: random.Random, world: WorldConfig | None = None) -> Scene:
    """A random scene: 1..N objects in distinct cells, with random shape, colour and size."""
    world = world or WorldConfig()
    n = rng.randint(world.min_objects, world.max_objects)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    shapes = list(world.shape_weights)
    weights = [world.shape_weights[s] for s in shapes]
    objects = [
        SceneObject(
            shape=rng.choices(shapes, weights)[0],
            colour=rng.choice(list(COLOURS)),
            size=rng.choice(SIZES),
            position=POSITIONS[c],
        )
        for c in cells
    ]
    return Scene(objects=objects, jitter_seed=rng.randrange(2**31))


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(shape)


def draw_scene(scene: Scene) -> tuple[Any, Scene]:
    """Render a scene; returns the image and the scene with each object's pixel box filled in."""
    from PIL import Image, ImageDraw

    rng = random.Random(scene.jitter_seed)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE // 2
    placed = []
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 2)
        r = rng.uniform(19, 23) if obj.size == "large" else rng.uniform(11, 14)
        slack = cell / 2 - r - 2
        cx = col * cell + cell / 2 + rng.uniform(-slack, slack)
        cy = row * cell + cell / 2 + rng.uniform(-slack, slack)
        colour = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[obj.colour])
        box = (round(cx - r), round(cy - r), round(cx + r), round(cy + r))
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            side = r * 0.9
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=colour)
        elif obj.shape == "cross":
            arm = r * 0.36
            draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=colour)
            draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=colour)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=colour)
        placed.append(SceneObject(obj.shape, obj.colour, obj.size, obj.position, box))
    return image, Scene(objects=placed, jitter_seed=scene.jitter_seed)


def biased_names(scene: Scene, rules: tuple[BiasRule, ...], rng: random.Random) -> list[str]:
    """The shape each object is called in one biased caption (the true shape unless a rule fires)."""
    names = []
    for obj in scene.objects:
        name = obj.shape
        for rule in rules:
            if rule.applies_to(scene, obj) and rng.random() < rule.p:
                name = rule.substitute
                break
        names.append(name)
    return names


def biased_description(scene: Scene, rules: tuple[BiasRule, ...], rng: random.Random) -> list[str]:
    """One biased caption's sentences: the reference sentences, with rule-fired objects misnamed."""
    return [o.sentence(name) for o, name in zip(scene.objects, biased_names(scene, rules, rng))]


# ---- splits on disk --------------------------------------------------------------------------------------------
SPLITS = ("train", "pairs", "test")


@dataclass
class WorldImage:
    """One generated image on disk with its ground truth."""

    id: str  # first 20 hex digits of the PNG's sha256 (stage 1 uses the same id)
    split: str
    image: str
    scene: Scene

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "split": self.split,
            "image": self.image,
            "objects": [asdict(o) for o in self.scene.objects],
            "jitter_seed": self.scene.jitter_seed,
            "description": self.scene.description(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldImage:
        return cls(id=data["id"], split=data["split"], image=data["image"], scene=Scene.from_dict(data))


def generate_split(
    folder: Path,
    split: str,
    n: int,
    seed: int,
    world: WorldConfig | None = None,
    taken: set[str] | None = None,
    blocked: set[str] | None = None,
) -> list[WorldImage]:
    """Draw `n` images of one split into `folder/<split>/`; images whose content is in `taken` are redrawn.

    The split's random stream is seeded by (seed, split), so the same call always gives the same images, and
    the splits of one seed never share an image (checked by content hash, not assumed).
    """
    import io

    taken = taken if taken is not None else set()
    rng = random.Random(f"capdpo-synthetic:{seed}:{split}")
    out_dir = folder / split
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    while len(images) < n:
        image, scene = draw_scene(sample_scene(rng, world))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        if digest in taken or digest[:20] in (blocked or ()):
            continue
        taken.add(digest)
        path = out_dir / f"{len(images):05d}_{digest[:8]}.png"
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        images.append(WorldImage(id=digest[:20], split=split, image=str(path.resolve()), scene=scene))
    return images


def generate_world(
    folder: str | Path,
    sizes: dict[str, int],
    seed: int,
    world: WorldConfig | None = None,
    exclude: set[str] | None = None,
) -> dict[str, list[WorldImage]]:
    """Generate the splits (`train`, `pairs`, `test`) with the given sizes; writes `<folder>/<split>.jsonl` too.

    `exclude` holds image ids (sha256 prefixes, as `WorldImage.id`) that must not be drawn again, e.g. the
    images a model was trained on."""
    from capdpo.jsonl import write_jsonl

    folder = Path(folder)
    taken: set[str] = set()
    blocked = {i[:20] for i in exclude or ()}
    out = {}
    for split in SPLITS:
        if split not in sizes:
            continue
        out[split] = generate_split(folder, split, sizes[split], seed, world, taken, blocked)
        write_jsonl(folder / f"{split}.jsonl", [w.to_dict() for w in out[split]])
    return out


def read_split(path: str | Path) -> list[WorldImage]:
    """The images of a split file written by `generate_world`."""
    from capdpo.jsonl import iter_jsonl

    return [WorldImage.from_dict(r) for r in iter_jsonl(path)]


def write_demo_images(folder: str | Path, n: int = 96) -> list[Path]:
    """The demo's images (`configs/synthetic_demo.yaml`): seeded scenes, the first half each with a circle (so the
    strong model's circle -> triangle bias shows), with their ground truth in `truth.jsonl` (`WorldImage` records,
    image paths relative to `folder`) and a README listing it."""
    from capdpo.jsonl import write_jsonl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random("capdpo-synthetic-demo")
    paths, rows, truth = [], [], []
    while len(paths) < n:
        scene = sample_scene(rng)
        if len(paths) < n // 2 and "circle" not in scene.shapes:
            continue
        image, scene = draw_scene(scene)
        path = folder / f"shapes_{len(paths):02d}.png"
        image.save(path, optimize=True)
        paths.append(path)
        rows.append(f"| {path.name} | {scene.description()} |")
        image_id = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
        truth.append(WorldImage(id=image_id, split="demo", image=path.name, scene=scene).to_dict())
    write_jsonl(folder / "truth.jsonl", truth)
    (folder / "README.md").write_text(
        "Synthetic images for `configs/synthetic_demo.yaml`, drawn by `capdpo.synthetic.world.write_demo_images` "
        "(seeded: the same call redraws the same files). Ground truth (also in `truth.jsonl`, which "
        "`capdpo.synthetic.truth_report` reads):\n\n| file | description |\n|---|---|\n" + "\n".join(rows) + "\n"
    )
    return paths
