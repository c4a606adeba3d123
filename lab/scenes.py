"""Synthetic scenes for the lab model: one or two flat-coloured shapes on a neutral background,
each with the one caption that describes it exactly.

    python -m lab.scenes --n 10000 --seed 0 --out data/scenes [--pairs 0.5] [--noise 2]

writes data/scenes/00000.png, 00001.png, ... and, last, data/scenes/captions.txt (line k = caption
of image k) into a new or empty folder: nothing is written over. The grammar is closed and tiny:

    a <color> <shape>
    a <color> <shape> <relation> a <color> <shape>      (two different colours)

with COLORS, SHAPES and RELATIONS below. A relation is a fact about the objects' pixel centroids:
along the stated axis they are at least 10% of the image side apart, and further apart than along
the other axis, so the caption names the salient relation. Everything is drawn from a seeded
random.Random, so a seed gives the same scenes on every machine. Only PIL and the standard library
are used: data-loader workers render thousands of scenes a minute without importing torch.
"""
import colorsys
import math
import os
import random
import re
from dataclasses import dataclass
from functools import partial

from PIL import Image, ImageChops, ImageDraw

from lab.cli import FolderError, path_flag, prepare_out, save_new

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# (centre, half-width) of each colour's hue window, in degrees; the checker widens them
HUES = {"red": (0, 8), "yellow": (55, 8), "green": (120, 15), "blue": (230, 15)}
SATURATION = (0.65, 1.0)            # of the objects (HSV), and their value:
VALUE = (0.65, 1.0)
BACKGROUND_SATURATION = 0.1         # the background is neutral: at most this saturated,
BACKGROUND_VALUE = (0.3, 0.8)       # and of a middle brightness, so every colour stands out
# the background's channels are 70-204 (round(0.8 * 255) at most), so noise of up to +-51 grey levels
# never clips; beyond, the brighter backgrounds clip (at +-100000 every background is black)
MAX_NOISE = 255 - round(BACKGROUND_VALUE[1] * 255)
# relation -> (axis: 0 = x, 1 = y; sign of the second object's centroid minus the first's)
AXES = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}

_CAPTION = re.compile(r"a (\w+) (\w+)(?: (to the left of|to the right of|above|below) a (\w+) (\w+))?")


@dataclass(frozen=True)
class Item:
    """One named object of a caption."""
    color: str
    shape: str

    def __str__(self):
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Description:
    """A parsed caption: one or two items and, for two, the relation of the first to the second."""
    objects: tuple
    relation: str | None = None

    @property
    def kind(self):
        return "pair" if self.relation else "single"

    def __str__(self):
        first = str(self.objects[0])
        return f"{first} {self.relation} {self.objects[1]}" if self.relation else first


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. The defaults are the lab model's data; sizes are fractions of `size`."""
    size: int = 128                 # image side in pixels
    min_side: float = 0.20          # object bounding-box side, as a fraction of `size`: 0.20-0.45
    max_side: float = 0.45
    gap: int = 4                    # background pixels at least between two objects' bounding boxes
    inset: int = 2                  # objects keep this far from the border (the checker reads the border)
    margin: float = 0.10            # a relation's centroid distance along its axis, fraction of `size`
    salience: float = 2.0           # ... which beats the other axis' distance by this many pixels, so a
    #                                 checker measuring rendered (blurred, noisy) centroids still agrees
    noise: int = 2                  # faint background noise: uniform +-noise grey levels (0 = flat)
    supersample: int = 4            # shapes are drawn this much larger, then box-filtered: smooth edges


@dataclass(frozen=True)
class Placed:
    """An object on the canvas: its bounding box is the square [x, x+side) x [y, y+side) in pixels."""
    color: str
    shape: str
    x: int
    y: int
    side: int
    rgb: tuple

    @property
    def box(self):
        """(left, top, right, bottom), right and bottom exclusive."""
        return self.x, self.y, self.x + self.side, self.y + self.side

    @property
    def centroid(self):
        """The shape's centre of mass in pixel coordinates (pixel i spans [i, i+1)). An apex-up
        triangle's is two thirds of the way down, not its box centre."""
        down = 2 / 3 if self.shape == "triangle" else 1 / 2
        return self.x + self.side / 2, self.y + self.side * down


@dataclass(frozen=True)
class Scene:
    """Everything that determines an image: draw(scene) is a pure function of it."""
    description: Description
    background: tuple               # flat RGB
    objects: tuple                  # Placed, in the caption's order
    noise_seed: int

    @property
    def caption(self):
        return str(self.description)


def parse(caption):
    """The Description of a caption of the grammar above; ValueError for anything else (other
    words, capitals, punctuation, extra spaces, or two objects of one colour)."""
    m = _CAPTION.fullmatch(caption) if isinstance(caption, str) else None
    if not m:
        raise ValueError(f"not a scene caption: {caption!r}")
    color1, shape1, relation, color2, shape2 = m.groups()
    items = [(color1, shape1)] + ([(color2, shape2)] if relation else [])
    for color, shape in items:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"not a scene caption: {caption!r} (colors {COLORS}, shapes {SHAPES})")
    if relation and color1 == color2:
        raise ValueError(f"not a scene caption: {caption!r} (the two objects must differ in colour)")
    return Description(tuple(Item(c, s) for c, s in items), relation)


def as_rng(seed):
    """A random.Random from an int or str seed (str seeds hash with SHA-512: the same everywhere),
    or the Random itself."""
    return seed if isinstance(seed, random.Random) else random.Random(seed)


def sample_description(rng, pairs=0.5):
    """A random Description: a pair with probability `pairs`, else a single object."""
    rng = as_rng(rng)
    if rng.random() < pairs:
        color1, color2 = rng.sample(COLORS, 2)
        items = (Item(color1, rng.choice(SHAPES)), Item(color2, rng.choice(SHAPES)))
        return Description(items, rng.choice(RELATIONS))
    return Description((Item(rng.choice(COLORS), rng.choice(SHAPES)),))


def sample_captions(n, seed=0, pairs=0.5):
    """n random captions; the same seed gives the same list, and a longer list extends a shorter one."""
    rng = random.Random(seed)
    return [str(sample_description(rng, pairs)) for _ in range(n)]


def hsv(rgb):
    """(hue in degrees, saturation, value) of an 8-bit RGB triple."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360, s, v


def hue_distance(a, b):
    """Angle between two hues in degrees, 0-180."""
    return abs((a - b + 180) % 360 - 180)


def object_rgb(color, rng):
    """An 8-bit RGB of `color`, jittered inside its hue window and the saturation and value ranges.
    Redrawn until the *rounded* colour is still inside them, so rendered pixels obey them exactly."""
    centre, half = HUES[color]
    while True:
        h = (centre + rng.uniform(-half, half)) % 360
        rgb = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h / 360, rng.uniform(*SATURATION),
                                                               rng.uniform(*VALUE)))
        h, s, v = hsv(rgb)
        if hue_distance(h, centre) <= half and SATURATION[0] <= s and VALUE[0] <= v:
            return rgb


def background_rgb(rng):
    """A neutral 8-bit RGB: any hue, saturation <= 0.1, value in 0.3-0.8 (checked after rounding)."""
    while True:
        rgb = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, BACKGROUND_SATURATION),
                                                               rng.uniform(*BACKGROUND_VALUE)))
        _, s, v = hsv(rgb)
        if s <= BACKGROUND_SATURATION and BACKGROUND_VALUE[0] <= v <= BACKGROUND_VALUE[1]:
            return rgb


def box_gap(a, b):
    """Background pixels between two objects' bounding boxes along the axis that separates them most
    (negative when the boxes overlap)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def relation_holds(a, b, relation, config=SceneConfig()):
    """The generator's rule: `a <relation> b` by centroids, with config.margin of the side along the
    axis, and that distance beating the other axis' by config.salience pixels."""
    axis, sign = AXES[relation]
    delta = [q - p for p, q in zip(a.centroid, b.centroid, strict=True)]
    along, across = sign * delta[axis], abs(delta[1 - axis])
    return along >= config.margin * config.size and along - across >= config.salience


def _place(item, rgb, rng, config):
    """`item` at a random size and position, fully inside the image (config.inset from the border)."""
    lo, hi = math.ceil(config.min_side * config.size), math.floor(config.max_side * config.size)
    side = rng.randint(lo, hi)
    far = config.size - config.inset - side
    return Placed(item.color, item.shape, rng.randint(config.inset, far), rng.randint(config.inset, far), side, rgb)


def layout(caption, rng=0, config=SceneConfig()):
    """A random Scene satisfying `caption` (str or Description), drawn from `rng` (Random or seed).
    Pairs are placed by rejection: each try draws both sizes and positions afresh (cheap: ~10 tries)."""
    description = parse(caption) if isinstance(caption, str) else caption
    rng = as_rng(rng)
    background = background_rgb(rng)
    rgbs = [object_rgb(item.color, rng) for item in description.objects]
    for _ in range(100_000):
        objects = tuple(_place(item, rgb, rng, config) for item, rgb in zip(description.objects, rgbs, strict=True))
        if len(objects) == 1 or (box_gap(*objects) >= config.gap
                                 and relation_holds(*objects, description.relation, config)):
            return Scene(description, background, objects, rng.getrandbits(32))
    raise RuntimeError(f"could not place {description} with {config}")


def _shape(draw, placed, k):
    """Draw one shape, `k` times enlarged, in white: the coverage mask."""
    x0, y0, x1, y1 = (k * c for c in placed.box)
    if placed.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif placed.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    else:   # upright isosceles: apex at the top middle, base along the bottom edge
        draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=255)


def draw(scene, config=SceneConfig()):
    """The PIL RGB image of a Scene. Shapes are drawn into a supersampled coverage mask that is
    box-filtered down (anti-aliased edges), and composited in their colours over the background."""
    size, k = config.size, config.supersample
    mask = Image.new("L", (size * k, size * k))
    pen = ImageDraw.Draw(mask)
    for placed in scene.objects:
        _shape(pen, placed, k)
    mask = mask.reduce(k) if k > 1 else mask
    paint = Image.new("RGB", (size, size))
    pen = ImageDraw.Draw(paint)
    for placed in scene.objects:     # the boxes are disjoint (gap >= 4), so each box can hold its colour
        x0, y0, x1, y1 = placed.box
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=placed.rgb)
    return Image.composite(paint, _background(scene, config), mask)


def _background(scene, config):
    """The flat background colour plus grey (equal-channel) noise, which adds no saturation."""
    size, a = config.size, config.noise
    flat = Image.new("RGB", (size, size), scene.background)
    if a <= 0:
        return flat
    rng = random.Random(scene.noise_seed)
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size))
    noise = noise.point([v * (2 * a + 1) // 256 for v in range(256)]).convert("RGB")   # uniform 0..2a
    return ImageChops.add(flat, noise, offset=-a)


def render(caption, seed=0, config=SceneConfig()):
    """A PIL image of a random scene that `caption` describes exactly; `seed` is an int, a str or a
    random.Random. The trainer's "scene for this caption"."""
    return draw(layout(caption, seed, config), config)


def random_scene(rng, pairs=0.5, config=SceneConfig()):
    """(image, caption) of a random scene: the trainer's "random scene with its caption"."""
    rng = as_rng(rng)
    scene = layout(sample_description(rng, pairs), rng, config)
    return draw(scene, config), scene.caption


def image_seed(seed, k):
    """The seed of image k of a data set: one per image, so any image renders on its own
    (data-loader workers, resuming) and the same everywhere."""
    return f"{seed}/{k}"


def write_dataset(out, n, seed=0, pairs=0.5, config=SceneConfig()):
    """Write out/00000.png ... and then out/captions.txt into `out`, a new or empty folder (see
    prepare_out); returns the captions. Captions come from sample_captions(n, seed, pairs), image k
    from render(caption k, image_seed(seed, k)). captions.txt comes last, so an interrupted run leaves
    whole PNGs and no captions.txt: lab.check refuses such a folder rather than score part of it."""
    prepare_out(out)
    captions = sample_captions(n, seed, pairs)
    for k, caption in enumerate(captions):
        image = render(caption, image_seed(seed, k), config)
        save_new(os.path.join(out, f"{k:05d}.png"), partial(image.save, format="PNG"))
    save_new(os.path.join(out, "captions.txt"), lambda f: f.write("".join(c + "\n" for c in captions).encode()))
    return captions


def scene_caption(text, where):
    """`text` if it is a scene caption, else FolderError naming `where` it comes from."""
    try:
        return str(parse(text))
    except ValueError as e:
        raise FolderError(f"{where}: {e}; lab.check scores lab scene captions only") from None


def main(argv=None):
    from sampler.cli import Parser  # here, not above: the render workers import this module without torch
    p = Parser(prog="python -m lab.scenes", description=__doc__)
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files (0 or more)")
    p.add_argument("--out", required=True, type=path_flag, help="output folder: new or empty (nothing is written over)")
    p.add_argument("--pairs", type=float, default=0.5, help="fraction of two-object scenes (default 0.5)")
    p.add_argument("--noise", type=int, default=SceneConfig.noise,
                   help=f"background noise, +- grey levels, 0-{MAX_NOISE} (default {SceneConfig.noise}; 0 = flat)")
    args = p.parse_args(argv)
    for wrong, flag, why in ((args.n < 1, "--n", "the number of images must be at least 1"),
                             # random.Random(-s) draws what random.Random(s) does: -s would repeat s's captions
                             (args.seed < 0, "--seed", "must be 0 or more (a negative one repeats another's captions)"),
                             (not 0 <= args.pairs <= 1, "--pairs", "the fraction of two-object scenes must be 0-1"),
                             (not 0 <= args.noise <= MAX_NOISE, "--noise",
                              f"must be 0 (flat) to {MAX_NOISE} grey levels (above, the brighter backgrounds clip)")):
        if wrong:
            p.error(f"{flag} {getattr(args, flag[2:])}: {why}")
    try:
        write_dataset(args.out, args.n, args.seed, args.pairs, SceneConfig(noise=args.noise))
    except FolderError as e:     # from prepare_out, before anything is rendered
        p.error(str(e))
    except KeyboardInterrupt:
        written = sum(f.endswith(".png") for f in os.listdir(args.out)) if os.path.isdir(args.out) else 0
        raise SystemExit(f"interrupted; {args.out} holds {written} of {args.n} whole PNGs and no captions.txt: "
                         "delete it and run again") from None
    except OSError as e:    # the disk filling up, the folder removed meanwhile: the OS's line names the file
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.n} scenes and captions.txt to {args.out}")


if __name__ == "__main__":
    main()
