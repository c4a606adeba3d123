"""An exact caption checker for lab scenes: does an image show precisely what its caption says?

    python -m lab.check DIR [--json FILE] [-v]

reads the captions from DIR/captions.txt (line k for the k-th PNG in numeric order) or, without
it, from each PNG's `parameters` text chunk (JSON with "prompt" and "seed", as sample.py writes:
each prompt and seed counts once), and prints the accuracy overall, per kind and per relation.

check(image, caption) finds the objects in the image without knowing the caption, then compares:
  1. foreground: pixels clearly more colourful than the background (estimated from the border) or
     much lighter / darker than it; images are 3x3-smoothed first so noise does not flip pixels;
  2. colour: each foreground pixel's hue falls in one of four widened hue windows (else "other");
  3. objects: connected components per colour after a 3x3 opening (which strips anti-aliased
     fringes and one-pixel bridges), dropping specks smaller than 1.5% of the image;
  4. shape: from the bounding box. Its aspect ratio must be about 1; then the fill ratio (square ~1,
     circle ~pi/4, triangle ~1/2) and where the mass sits vertically (a triangle's centroid is 2/3
     down its box, the others' 1/2) pick the shape, or "other";
  5. the caption holds iff the objects found are exactly the ones it names (colour and shape, no
     extra one, none missing) and, for a pair, the first's centroid lies on the stated side of the
     second's: in the right direction by more than 5% of the side, and along the stated axis more
     than along the other. (The generator's 10% margin is its own rule; the checker only needs the
     direction to be clear.)
It is meant for generated images too: soft edges, colour drift, blur, noise and specks are tolerated.
"""
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from lab.cli import FolderError, check_new_file, list_pngs, path_flag, read_listing, save_new
from lab.scenes import AXES, COLORS, RELATIONS, parse, scene_caption
from sampler.cli import Parser

# each colour's accepted hues (degrees): the generator's windows widened by ~20 degrees; hues in the
# gaps (orange-ish 84-86, cyan, purple / magenta) are "other", an object nobody asked for
HUE_WINDOWS = {"red": (-28, 28), "yellow": (28, 84), "green": (86, 160), "blue": (190, 270)}
OTHER = "other"
CLASSES = (*COLORS, OTHER)
ANALYSIS_SIDE = 128     # larger images are analysed at this size (longer side): the scenes' own size


@dataclass(frozen=True)
class CheckConfig:
    """Thresholds of the checker; fractions are of the image side (distances) or area (areas)."""
    chroma: float = 0.2             # foreground: chroma (max - min of RGB in [0, 1]) at least this ...
    above_background: float = 0.12  # ... and this much above the background's chroma ...
    distance: float = 0.15          # ... and an RGB channel this far from the background colour;
    value: float = 0.2              # or achromatic but this much lighter / darker ("other")
    min_area: float = 0.015         # smaller components are specks (the smallest object is ~2%)
    max_aspect: float = 1.35        # box width / height within [1 / max_aspect, max_aspect]
    # measured on 300 scenes, clean and blurred (radius 1.5): fill of squares 0.92-1, circles 0.73-0.84,
    # triangles 0.54-0.66 (blur blunts the apex); centroid drop of triangles 0.61-0.66, others 0.49-0.51
    square_fill: float = 0.88       # level centroid and fill >= this: square; circle_fill to this: circle
    circle_fill: float = 0.66
    triangle_fill: float = 0.75     # triangle: fill below this and centroid at least triangle_drop
    triangle_drop: float = 0.57     # down its box
    level_drop: float = 0.45        # circle / square: centroid between level_drop and 1 - level_drop
    direction: float = 0.05         # a relation's centroid displacement, at least this fraction of the side


@dataclass
class Found:
    """An object the checker found. centroid is (x, y) in pixels (pixel i spans [i, i+1)), box is
    (left, top, right, bottom) with right and bottom exclusive, area in pixels."""
    color: str
    shape: str
    centroid: tuple
    area: int
    box: tuple

    def __str__(self):
        name = "unknown object" if self.color == self.shape == OTHER else f"{self.color} {self.shape}"
        return f"{name} at ({self.centroid[0]:.0f}, {self.centroid[1]:.0f})"

    def to_json(self):
        return {**asdict(self), "centroid": [round(c, 2) for c in self.centroid], "box": list(self.box)}


@dataclass
class Verdict:
    """check()'s answer: correct, the objects found, and why not when wrong."""
    correct: bool
    found: list = field(default_factory=list)
    reason: str = ""


def rgb_image(image):
    """An RGB PIL image from a PIL image or a path (FolderError naming a file that does not decode)."""
    return image.convert("RGB") if isinstance(image, Image.Image) else read_png(image)[0]


def load(image):
    """An RGB PIL image (from PIL or a path) box-filtered down to at most ANALYSIS_SIDE pixels on its
    longer side: the 3x3 kernels below then mean the same at any resolution, and every tensor stays
    under torch's parallel grain size (32768 elements), so no threads are woken for tiny work (on a
    busy machine they cost far more than they give)."""
    image = rgb_image(image)
    longer = max(image.size)
    if longer > ANALYSIS_SIDE:
        w, h = image.size
        image = image.resize((max(1, round(w * ANALYSIS_SIDE / longer)), max(1, round(h * ANALYSIS_SIDE / longer))),
                             Image.BOX)
    return image


def planes(image):
    """The R, G and B planes of a PIL image as (H, W) float tensors in [0, 1] (one per channel, see load())."""
    w, h = image.size
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(h, w, 3)
    return [data[..., c].float() / 255 for c in range(3)]


def hue_degrees(r, g, b):
    """HSV hue in degrees (0-360) of the RGB planes; 0 where a pixel is grey."""
    high = torch.maximum(torch.maximum(r, g), b)
    chroma = (high - torch.minimum(torch.minimum(r, g), b)).clamp_min(1e-6)
    h = torch.where(high == r, ((g - b) / chroma) % 6,
                    torch.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return h * 60


def background_color(rgb, ring=2):
    """The background colour [r, g, b]: per-channel median of the outer `ring` pixels (objects stay
    clear of the border; the median ignores the few that do not)."""
    return [torch.cat([p[:ring].flatten(), p[-ring:].flatten(), p[ring:-ring, :ring].flatten(),
                       p[ring:-ring, -ring:].flatten()]).median().item() for p in rgb]


def _pad(x, value=None):
    """An (H, W) tensor with a one-pixel border: `value`, or the edge pixels repeated when None.
    (Slice copies, not F.pad: F.pad wakes every thread even for a tiny tensor.)"""
    out = x.new_full((x.shape[0] + 2, x.shape[1] + 2), 0 if value is None else value)
    out[1:-1, 1:-1] = x
    if value is None:
        out[0, 1:-1], out[-1, 1:-1] = x[0], x[-1]
        out[:, 0], out[:, -1] = out[:, 1], out[:, -2]
    return out


def _neighbourhood(x, combine, edge=None):
    """combine() over each pixel's 3x3 neighbourhood of an (H, W) tensor, outside pixels being `edge`
    (None: the nearest inside one), separably: two passes of three shifted views, far faster on a CPU
    than max_pool2d / avg_pool2d with stride 1."""
    x = _pad(x, edge)
    rows = combine(combine(x[:, :-2], x[:, 1:-1]), x[:, 2:])
    return combine(combine(rows[:-2], rows[1:-1]), rows[2:])


def classify_pixels(rgb, config=CheckConfig()):
    """One (H, W) bool mask per class in CLASSES: each foreground pixel of the RGB planes in its
    colour's mask, or in "other"."""
    r, g, b = smooth = [_neighbourhood(p, torch.add) / 9 for p in rgb]
    bg = background_color(smooth)
    high, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    far = torch.maximum(torch.maximum((r - bg[0]).abs(), (g - bg[1]).abs()), (b - bg[2]).abs()) >= config.distance
    colorful = far & (high - low >= max(config.chroma, max(bg) - min(bg) + config.above_background))
    achromatic = ~colorful & ((high - max(bg)).abs() >= config.value)
    hue = hue_degrees(r, g, b)
    masks, named = [], torch.zeros_like(colorful)
    for color in COLORS:
        lo, hi = HUE_WINDOWS[color]
        inside = (hue >= lo % 360) | (hue < hi) if lo < 0 else (hue >= lo) & (hue < hi)
        masks.append(colorful & inside)
        named |= masks[-1]
    return [*masks, achromatic | (colorful & ~named)]


def opening(mask):
    """3x3 morphological opening of an (H, W) bool mask: removes fringes, one-pixel lines and specks.
    (Erosion pads by replication, so objects touching the border are not eaten from outside.)"""
    eroded = _neighbourhood(mask, torch.logical_and)
    return _neighbourhood(eroded, torch.logical_or, False)


def runs(mask):
    """The horizontal runs of a (H, W) bool mask, row by row: [(row, start, end)], end exclusive."""
    edges = torch.diff(mask.to(torch.int8), dim=1, prepend=mask.new_zeros(mask.shape[0], 1, dtype=torch.int8),
                       append=mask.new_zeros(mask.shape[0], 1, dtype=torch.int8))
    starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
    return [(row, start, end) for (row, start), (_, end) in zip(starts, ends, strict=True)]


def components(mask):
    """8-connected components of a (H, W) bool mask, each as its list of runs: union-find over runs
    that touch (overlap, or meet diagonally) in consecutive rows. A 128 x 128 scene has ~100 runs."""
    spans = runs(mask)
    parent = list(range(len(spans)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above, current, row = [], [], None        # runs of the previous row and of this one
    for i, (r, start, end) in enumerate(spans):
        if r != row:
            above = current if row is not None and r == row + 1 else []
            current, row = [], r
        for j in above:
            _, s2, e2 = spans[j]
            if s2 <= end and start <= e2:       # within one column of each other: 8-connected
                parent[root(i)] = root(j)
        current.append(i)
    groups = {}
    for i, span in enumerate(spans):
        groups.setdefault(root(i), []).append(span)
    return list(groups.values())


def measure(spans):
    """(area, box, centroid) of a component given as runs; see Found for the conventions."""
    area = sum(end - start for _, start, end in spans)
    # the pixel centres of a run [start, end) sum to (end - start) * (start + end) / 2
    cx = sum((end - start) * (start + end) / 2 for _, start, end in spans) / area
    cy = sum((end - start) * (row + 0.5) for row, start, end in spans) / area
    box = (min(s[1] for s in spans), min(s[0] for s in spans),
           max(s[2] for s in spans), max(s[0] for s in spans) + 1)
    return area, box, (cx, cy)


def classify_shape(area, box, centroid_y, config=CheckConfig()):
    """circle / square / triangle (apex up) / other, from the box's aspect ratio, the fill ratio and
    how far down the box the centroid sits."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    if not 1 / config.max_aspect <= w / h <= config.max_aspect:
        return OTHER
    fill, drop = area / (w * h), (centroid_y - top) / h
    if fill < config.triangle_fill and drop >= config.triangle_drop:
        return "triangle"
    if config.level_drop <= drop <= 1 - config.level_drop:
        if fill >= config.square_fill:
            return "square"
        if fill >= config.circle_fill:
            return "circle"
    return OTHER


def find_objects(image, config=CheckConfig()):
    """The objects in an image (PIL or path), largest first, knowing nothing of its caption.
    Centroids, boxes and areas are in the image's own pixels, whatever size it was analysed at."""
    image = rgb_image(image)
    analysed = load(image)
    w, h = analysed.size
    scale = image.size[0] / w
    found = []
    for color, mask in zip(CLASSES, classify_pixels(planes(analysed), config), strict=True):
        for spans in components(opening(mask)):
            area, box, centroid = measure(spans)
            if area >= config.min_area * h * w:
                shape = classify_shape(area, box, centroid[1], config) if color != OTHER else OTHER
                found.append(Found(color, shape, tuple(c * scale for c in centroid), round(area * scale ** 2),
                                   tuple(round(c * scale) for c in box)))
    return sorted(found, key=lambda f: -f.area)


def relation_seen(a, b, relation, side, config=CheckConfig()):
    """Whether found object a is <relation> b: the right direction by more than config.direction of
    the side, along the stated axis more than along the other."""
    axis, sign = AXES[relation]
    delta = [q - p for p, q in zip(a.centroid, b.centroid, strict=True)]
    along = sign * delta[axis]
    return along > config.direction * side and along > abs(delta[1 - axis])


def check(image, caption, config=CheckConfig()):
    """Verdict on whether `image` (PIL or path) shows exactly `caption` (ValueError if the caption is
    not of the scene grammar)."""
    description = parse(caption)
    image = rgb_image(image)
    found = find_objects(image, config)
    named = [(i.color, i.shape) for i in description.objects]
    seen = [(f.color, f.shape) for f in found]
    if sorted(named) != sorted(seen):
        listed = ", ".join(map(str, found)) or "nothing"
        return Verdict(False, found, f"expected {' and '.join(map(str, description.objects))}; found {listed}")
    if description.relation:
        first, second = (found[seen.index(n)] for n in named)
        if not relation_seen(first, second, description.relation, min(image.size), config):
            return Verdict(False, found, f"{first} is not {description.relation} {second}")
    return Verdict(True, found)


def read_png(path):
    """(RGB image, `parameters` text or None) of a PNG, decoded in full; FolderError naming a broken one."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB"), getattr(image, "text", {}).get("parameters")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FolderError(f"{path} is not a readable image ({e}); delete or regenerate it") from None


def read_captions(folder):
    """([(png, caption)] to score, [(repeated png, the one it repeats)]): captions.txt line k for the k-th
    PNG, else the PNGs' `parameters` JSON, each (prompt, seed) once (sample.py numbers PNGs on: a rerun
    after Ctrl-C writes the same images again). Every PNG is decoded and caption parsed before scoring."""
    paths = list_pngs(folder)
    texts = [read_png(path)[1] for path in paths]
    if os.path.exists(listing := os.path.join(folder, "captions.txt")):
        lines = read_listing(listing, len(paths))
        return [(path, scene_caption(line, f"{listing} line {k + 1}"))
                for k, (path, line) in enumerate(zip(paths, lines, strict=True))], []
    first, repeats = {}, []     # (prompt, seed) -> (its first png, settings), in order
    for path, text in zip(paths, texts, strict=True):
        try:
            settings = json.loads(text)
            prompt, seed = settings["prompt"], json.dumps(settings.get("seed", path))  # no seed: no repeat
        except (TypeError, KeyError, ValueError):
            raise FolderError(f"{path}: no captions.txt, and no prompt in the PNG's `parameters` (as sample.py "
                              "writes); add captions.txt, one caption per PNG in numeric order") from None
        earlier, before = first.setdefault((scene_caption(prompt, f"{path}: its prompt"), seed), (path, settings))
        if before != settings:  # which of the two should count?
            changed = ", ".join(k for k in {**before, **settings} if before.get(k) != settings.get(k))
            raise FolderError(f"{earlier} and {path} have the same prompt and seed but other {changed}: the folder "
                              "mixes runs; give each run a folder of its own")
        if earlier != path:
            repeats.append((path, earlier))
    return [(path, prompt) for (prompt, _), (path, _) in first.items()], repeats


def _accuracy(rows):
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else None, "n": len(rows)}


def check_folder(folder, config=CheckConfig()):
    """A folder's report: accuracy overall, by kind and by relation, each verdict, the repeats left out."""
    pairs, repeats = read_captions(folder)
    images = []
    for path, caption in pairs:
        verdict = check(path, caption, config)
        images.append({"file": os.path.basename(path), "caption": caption, "correct": verdict.correct,
                       "found": [f.to_json() for f in verdict.found], "reason": verdict.reason})
    duplicates = [{"file": os.path.basename(a), "same_as": os.path.basename(b)} for a, b in repeats]
    return {**summary(images), "images": images, "duplicates": duplicates}


def summary(rows):
    """Rows with "caption" and "correct" -> accuracy overall, by kind and by relation (each with its n)."""
    kinds = [parse(r["caption"]) for r in rows]
    return {"accuracy": _accuracy(rows)["accuracy"], "n": len(rows),
            "by_kind": {k: _accuracy([r for r, d in zip(rows, kinds, strict=True) if d.kind == k])
                        for k in ("single", "pair")},
            "by_relation": {rel: _accuracy([r for r, d in zip(rows, kinds, strict=True) if d.relation == rel])
                            for rel in RELATIONS}}


def _percent(entry):
    return "-" if entry["accuracy"] is None else f"{100 * entry['accuracy']:.1f}% of {entry['n']}"


def show(report, verbose):
    """Print the report: with `verbose`, each wrong image and why first."""
    for r in (r for r in report["images"] if verbose and not r["correct"]):
        print(f"{r['file']}: {r['caption']!r}: {r['reason']}")
    if d := report["duplicates"]:   # as a rerun of sample.py into the folder writes
        print(f"{len(d)} repeated images not counted (same prompt, seed and settings), e.g. {d[0]['file']} repeats "
              f"{d[0]['same_as']}")
    print(f"accuracy {_percent(report)}")
    for name, entry in [*report["by_kind"].items(), *report["by_relation"].items()]:
        print(f"  {name:16s} {_percent(entry)}")


def main(argv=None):
    p = Parser(prog="python -m lab.check", description=__doc__)
    p.add_argument("folder", type=path_flag, help="folder of PNGs, with captions.txt or captions in the PNGs")
    p.add_argument("--json", type=path_flag,
                   help="write the full report (accuracy, by_kind, by_relation, images) to this new file")
    p.add_argument("-v", "--verbose", action="store_true", help="list each wrong image and why")
    args = p.parse_args(argv)
    try:
        if args.json is not None:
            check_new_file(args.json, "--json")   # before scoring
        report = check_folder(args.folder)
        show(report, args.verbose)
        if args.json is not None:   # save_new leaves no file if the write fails or is interrupted
            save_new(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    except (FolderError, OSError) as e:     # OSError: an unreadable folder, a full disk (its line names the file)
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; no report written") from None
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)    # a long run of tiny tensors: other threads would only wait
    main()
