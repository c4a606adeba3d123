"""lab.scenes (the generator) and lab.check (the caption checker): geometry and colours measured on
the rendered pixels, determinism, the CLIs, and the checker's validity: it accepts the generator's
images, also blurred, noisy, drifted or speckled, and rejects shuffled or subtly wrong captions."""
import colorsys
import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from PIL.PngImagePlugin import PngInfo

from lab import check as C
from lab import scenes as S

CFG = S.SceneConfig()
N = 240     # scenes checked for validity: about half of them pairs, 30 per relation
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


pytestmark = pytest.mark.usefixtures("one_thread")   # small tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(2024)
    return [S.layout(S.sample_description(rng), rng) for _ in range(N)]


@pytest.fixture(scope="module")
def images(scenes):
    return [S.draw(scene) for scene in scenes]


def to_tensor(image):
    return torch.stack(C.planes(image.convert("RGB")))    # (3, H, W) float in 0-1


def pixels(image):
    return to_tensor(image) * 255     # (3, H, W) float in 0-255


def coverage(image, scene, placed):
    """Each pixel's share of `placed` (0-1) inside its box, from pixel = a * colour + (1 - a) * background."""
    x0, y0, x1, y1 = placed.box
    patch = pixels(image)[:, y0:y1, x0:x1]
    bg, rgb = torch.tensor(scene.background, dtype=torch.float32), torch.tensor(placed.rgb, dtype=torch.float32)
    direction = (rgb - bg)[:, None, None]
    a = ((patch - bg[:, None, None]) * direction).sum(0) / direction.pow(2).sum()
    return a.clamp(0, 1)


def pixel_centroid(image, scene, placed):
    a = coverage(image, scene, placed)
    ys, xs = torch.meshgrid(torch.arange(a.shape[0]), torch.arange(a.shape[1]), indexing="ij")
    return (placed.x + ((xs + 0.5) * a).sum().item() / a.sum().item(),
            placed.y + ((ys + 0.5) * a).sum().item() / a.sum().item())


def extent(image, scene, placed, level=0.02):
    """(left, top, right, bottom) of the pixels the object covers by more than `level`, right/bottom exclusive."""
    ys, xs = (coverage(image, scene, placed) > level).nonzero(as_tuple=True)
    return (placed.x + xs.min().item(), placed.y + ys.min().item(),
            placed.x + xs.max().item() + 1, placed.y + ys.max().item() + 1)


# ---- captions -------------------------------------------------------------------------------------

def all_captions():
    singles = [f"a {c} {s}" for c in S.COLORS for s in S.SHAPES]
    pairs = [f"{a} {r} {b}" for a in singles for r in S.RELATIONS for b in singles if a.split()[1] != b.split()[1]]
    return singles, pairs


def test_parse_round_trips_every_caption():
    singles, pairs = all_captions()
    assert len(singles) == 12 and len(pairs) == 12 * 4 * 9
    for kind, captions in (("single", singles), ("pair", pairs)):
        for caption in captions:
            d = S.parse(caption)
            assert str(d) == caption and d.kind == kind and len(d.objects) == (1 if kind == "single" else 2)
    d = S.parse("a red circle to the left of a blue triangle")
    assert d.objects == (S.Item("red", "circle"), S.Item("blue", "triangle")) and d.relation == "to the left of"
    assert S.parse("a green square") == S.Description((S.Item("green", "square"),))


@pytest.mark.parametrize("caption", [
    "", "a red circle.", "A red circle", "a red  circle", " a red circle", "a red circle\n", "a purple circle",
    "a red hexagon", "an red circle", "red circle", "a red circle and a blue square", "a red circle above",
    "a red circle above a red square", "a red circle next to a blue square", "a red circle left of a blue square",
    "a red circle to the left of a blue square to the left of a green circle", None, 3])
def test_parse_rejects_everything_else(caption):
    with pytest.raises(ValueError):
        S.parse(caption)


def test_sample_captions():
    captions = S.sample_captions(400, seed=5)
    assert captions == S.sample_captions(400, seed=5) and captions[:50] == S.sample_captions(50, seed=5)
    assert captions != S.sample_captions(400, seed=6)
    kinds = [S.parse(c).kind for c in captions]
    assert 0.4 < kinds.count("pair") / 400 < 0.6
    assert {S.parse(c).relation for c in captions} == {None, *S.RELATIONS}
    assert all(S.parse(c).kind == "single" for c in S.sample_captions(50, 1, pairs=0))
    assert all(S.parse(c).kind == "pair" for c in S.sample_captions(50, 1, pairs=1))


# ---- the generator's scenes, measured on the pixels ----------------------------------------------

def test_sizes_inside_and_gaps(scenes, images):
    assert {len(s.objects) for s in scenes} == {1, 2}
    for scene, image in zip(scenes, images, strict=True):
        assert image.size == (128, 128) and image.mode == "RGB"
        boxes = []
        for placed in scene.objects:
            assert 0.2 * 128 <= placed.side <= 0.45 * 128
            left, top, right, bottom = box = extent(image, scene, placed)
            assert 0 < left and 0 < top and right < 128 and bottom < 128          # fully inside
            assert placed.side - 1 <= right - left <= placed.side and placed.side - 1 <= bottom - top <= placed.side
            assert 0.2 * 128 - 1 <= right - left <= 0.45 * 128 and 0.2 * 128 - 1 <= bottom - top <= 0.45 * 128
            boxes.append(box)
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= 4        # background columns / rows between
        # nothing drawn outside the objects' boxes: the rest is background within the noise
        outside = torch.ones(128, 128, dtype=torch.bool)
        for x0, y0, x1, y1 in (p.box for p in scene.objects):
            outside[y0:y1, x0:x1] = False
        bg = torch.tensor(scene.background, dtype=torch.float32)[:, None]
        assert (pixels(image)[:, outside] - bg).abs().max() <= CFG.noise


def hsv(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360, s, v


def test_colors_on_the_pixels(scenes, images):
    seen = {c: [] for c in S.COLORS}
    for scene, image in zip(scenes, images, strict=True):
        for placed in scene.objects:
            full = coverage(image, scene, placed) > 0.999
            patch = pixels(image)[:, placed.y:placed.y + placed.side, placed.x:placed.x + placed.side][:, full]
            assert patch.shape[1] > 0.4 * placed.side ** 2
            assert (patch - patch[:, :1]).abs().max() == 0                       # solid: one colour
            h, s, v = hsv(patch[:, 0].tolist())
            centre, half = S.HUES[placed.color]
            assert abs((h - centre + 180) % 360 - 180) <= half + 1e-6
            assert 0.65 <= s <= 1 and 0.65 <= v <= 1
            seen[placed.color].append(h)
        if len(scene.objects) == 2:
            assert scene.objects[0].color != scene.objects[1].color
        # the background: neutral and of a middle brightness (the flat colour, and the border's mean)
        _, s, v = hsv(scene.background)
        assert s <= 0.1 and 0.3 <= v <= 0.8
        border = torch.cat([pixels(image)[:, :2].flatten(1), pixels(image)[:, -2:].flatten(1)], 1).mean(1)
        _, s, v = hsv(border.tolist())
        assert s <= 0.11 and 0.29 <= v <= 0.81
    # the jitter spans its window
    assert all(len(hs) > 20 for hs in seen.values())
    assert max(seen["blue"]) - min(seen["blue"]) > 15 and max(seen["green"]) - min(seen["green"]) > 15


def test_relations_by_pixel_centroids(scenes, images):
    for scene, image in zip(scenes, images, strict=True):
        for placed in scene.objects:     # the real centroid (a triangle's 2/3 down its box), to a quarter pixel
            cx, cy = pixel_centroid(image, scene, placed)
            assert abs(cx - placed.centroid[0]) < 0.25 and abs(cy - placed.centroid[1]) < 0.25
            if placed.shape == "triangle":
                assert cy - (placed.y + placed.side / 2) > placed.side / 7
        if scene.description.relation:
            (ax, ay), (bx, by) = (pixel_centroid(image, scene, p) for p in scene.objects)
            dx, dy = bx - ax, by - ay
            along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                             "above": (dy, dx), "below": (-dy, dx)}[scene.description.relation]
            assert along >= 0.1 * 128 - 0.25 and along > abs(across) + 1


def test_same_seed_same_scene():
    a, b = S.render("a red circle above a blue square", 7), S.render("a red circle above a blue square", 7)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != S.render("a red circle above a blue square", 8).tobytes()
    image, caption = S.random_scene(random.Random(3))
    again, caption2 = S.random_scene(random.Random(3))
    assert caption == caption2 and image.tobytes() == again.tobytes()
    flat = S.render("a red circle", 7, replace(CFG, noise=0))
    assert len(set(flat.crop((0, 0, 128, 2)).tobytes()[i:i + 3] for i in range(0, 768, 3))) == 1


def test_cli_writes_images_and_captions(tmp_path):
    out1, out2, out3 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cmd = [sys.executable, "-m", "lab.scenes", "--n", "6", "--seed", "3", "--out"]
    subprocess.run([*cmd, str(out1)], check=True, capture_output=True)
    S.main(["--n", "6", "--seed", "3", "--out", str(out2)])
    S.main(["--n", "6", "--seed", "4", "--out", str(out3), "--pairs", "1"])
    names = sorted(p.name for p in out1.iterdir())
    assert names == [f"0000{k}.png" for k in range(6)] + ["captions.txt"]
    captions = (out1 / "captions.txt").read_text().splitlines()
    assert captions == S.sample_captions(6, 3) and all(S.parse(c) for c in captions)
    for name in names:       # same seed, same bytes
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
    assert Image.open(out1 / "00002.png").tobytes() == S.render(captions[2], S.image_seed(3, 2)).tobytes()
    assert all(S.parse(c).kind == "pair" for c in (out3 / "captions.txt").read_text().splitlines())
    with pytest.raises(SystemExit):
        S.main(["--n", "2", "--out", str(tmp_path / "d"), "--pairs", "2"])


# ---- the checker --------------------------------------------------------------------------------

def accuracy(images, captions):
    return sum(C.check(image, caption).correct for image, caption in zip(images, captions, strict=True)) / len(images)


def test_checker_accepts_the_generators_images(scenes, images):
    verdicts = [C.check(image, s.caption) for s, image in zip(scenes, images, strict=True)]
    assert sum(v.correct for v in verdicts) / N >= 0.99
    for scene, verdict in zip(scenes, verdicts, strict=True):
        if not verdict.correct:
            continue
        assert verdict.reason == "" and len(verdict.found) == len(scene.objects)
        for placed in scene.objects:
            f = next(f for f in verdict.found if f.color == placed.color)
            assert f.shape == placed.shape
            assert abs(f.centroid[0] - placed.centroid[0]) < 1 and abs(f.centroid[1] - placed.centroid[1]) < 1
            true_area = placed.side ** 2 * {"square": 1, "circle": 0.785, "triangle": 0.5}[placed.shape]
            assert 0.85 < f.area / true_area < 1.3      # the edge pixels counted are over half covered


def test_checker_rejects_deranged_captions(scenes, images):
    order = list(range(N))
    rng = random.Random(0)
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    assert accuracy(images, [scenes[j].caption for j in order]) <= 0.10


def gaussian_noise(image, rng, std=8 / 255):
    x = to_tensor(image)
    x = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(rng.getrandbits(32))) * std).clamp(0, 1)
    return Image.frombytes("RGB", image.size, bytes((x * 255).round().byte().permute(1, 2, 0).flatten().tolist()))


def drift(image, rng):
    """Hue turned by about 6 degrees either way and brightness by up to 15%."""
    h, s, v = image.convert("HSV").split()
    turn = rng.choice([-4, 4])          # of 256 steps
    image = Image.merge("HSV", (h.point(lambda q: (q + turn) % 256), s, v)).convert("RGB")
    return ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))


def specks(image, rng, n=4):
    image = image.copy()
    pen = ImageDraw.Draw(image)
    for _ in range(n):
        x, y = rng.randrange(126), rng.randrange(126)
        pen.rectangle((x, y, x + 2, y + 2), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


PERTURBATIONS = {
    "blur": lambda image, rng: image.filter(ImageFilter.GaussianBlur(1.5)),
    "noise": gaussian_noise,
    "drift": drift,
    "specks": specks,
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_checker_is_robust(scenes, images, name):
    rng = random.Random(1)
    perturbed = [PERTURBATIONS[name](image, rng) for image in images[:200]]
    assert perturbed[0].tobytes() != images[0].tobytes()
    assert accuracy(perturbed, [s.caption for s in scenes[:200]]) >= 0.95


def test_checker_rejects_wrong_captions(scenes, images):
    pairs = [(s, im) for s, im in zip(scenes, images, strict=True) if s.description.relation][:40]
    singles = [(s, im) for s, im in zip(scenes, images, strict=True) if not s.description.relation][:40]
    for scene, image in pairs:
        d = scene.description
        a, b = d.objects
        other_color = next(c for c in S.COLORS if c not in (a.color, b.color))
        other_shape = next(s for s in S.SHAPES if s != a.shape)
        wrong = [str(a), str(b),                                                      # an extra object
                 str(replace(d, relation=OPPOSITE[d.relation])),                      # swapped relation
                 *(str(replace(d, relation=r)) for r in S.RELATIONS if r not in (d.relation, OPPOSITE[d.relation])),
                 str(S.Description((replace(a, color=other_color), b), d.relation)),  # wrong colour
                 str(S.Description((replace(a, shape=other_shape), b), d.relation))]  # wrong shape
        for caption in wrong:
            assert not C.check(image, caption).correct, caption
        # the same relation said the other way round is the same fact
        assert C.check(image, str(S.Description((b, a), OPPOSITE[d.relation]))).correct
    for scene, image in singles:
        (a,) = scene.description.objects
        other = S.Item(next(c for c in S.COLORS if c != a.color), "circle")
        other_shape = next(s for s in S.SHAPES if s != a.shape)
        for caption in (str(replace(a, color=other.color)), str(replace(a, shape=other_shape)),
                        f"{a} above {other}"):                                      # a missing object
            verdict = C.check(image, caption)
            assert not verdict.correct and verdict.reason, caption


def test_checker_rejects_odd_objects():
    scene = S.layout("a red square", 4)
    image = S.draw(scene)
    x, y = (20, 80) if scene.objects[0].x > 64 else (80, 80)
    for fill, shape in [((150, 40, 200), "square"), ((30, 200, 200), "square"), ((20, 20, 20), "square"),
                        (scene.objects[0].rgb, "inverted"), ((40, 40, 230), "bar")]:
        odd = image.copy()
        pen = ImageDraw.Draw(odd)
        box = (x, y, x + 30, y + 30) if shape != "bar" else (x, y, x + 40, y + 12)
        if shape == "inverted":
            pen.polygon((x, y, x + 30, y, x + 15, y + 30), fill=fill)
        else:
            pen.rectangle(box, fill=fill)
        verdict = C.check(odd, "a red square")
        assert not verdict.correct and len(verdict.found) == 2 and "other" in {verdict.found[1].color,
                                                                              verdict.found[1].shape}
    with pytest.raises(ValueError):
        C.check(image, "a red pentagon")


def test_check_cli_json(tmp_path, capsys):
    S.write_dataset(tmp_path / "set", 8, seed=1)
    report = C.main([str(tmp_path / "set"), "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["accuracy"] == 1.0 and saved["n"] == 8 and report["accuracy"] == 1.0
    assert saved["by_kind"]["single"]["n"] + saved["by_kind"]["pair"]["n"] == 8
    assert set(saved["by_relation"]) == set(S.RELATIONS)
    assert sum(r["n"] for r in saved["by_relation"].values()) == saved["by_kind"]["pair"]["n"]
    first = saved["images"][0]
    assert first["file"] == "00000.png" and first["correct"] and first["caption"] == S.sample_captions(1, 1)[0]
    assert {"color", "shape", "centroid", "area"} <= set(first["found"][0])
    assert "accuracy 100.0% of 8" in capsys.readouterr().out
    # without captions.txt: the prompts in the PNGs' parameters chunks (as sample.py writes them)
    folder = tmp_path / "generated"
    folder.mkdir()
    for k, caption in enumerate(["a red circle", "a blue square below a green circle", "a yellow triangle"]):
        said = "a red square" if k == 0 else caption
        info = PngInfo()
        info.add_text("parameters", json.dumps({"prompt": said, "seed": k}))
        S.render(caption, k).save(folder / f"{k:05d}.png", pnginfo=info)
    report = C.main([str(folder), "-v"])
    assert report["n"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    assert report["by_kind"]["single"] == {"accuracy": 0.5, "n": 2} and report["by_kind"]["pair"]["accuracy"] == 1
    assert report["by_relation"]["below"]["n"] == 1 and report["by_relation"]["above"] == {"accuracy": None, "n": 0}
    assert "00000.png: 'a red square'" in capsys.readouterr().out
