"""lab.train's pictures: sample sheets with their captions, and the checker's accuracy against training
time (pillow only, like the rest of the training code)."""
import json
import math

from PIL import Image, ImageDraw


def grid(images, captions, columns=4):
    """Images with their captions above, in a grid (pillow only)."""
    side, band = images[0].width, 24
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = k % columns * side, k // columns * (side + band)
        sheet.paste(image, (x, y + band))
        words = caption.split()
        draw.text((x + 2, y), " ".join(words[:5]), fill="black")
        draw.text((x + 2, y + 11), " ".join(words[5:]), fill="black")
    return sheet


def draw_curve(log_path, path, width=480, height=300):
    """Checker accuracy (all, single, pair) against training minutes, from log.jsonl."""
    rows = [json.loads(line) for line in open(log_path)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom, top = 40, height - 30, 10
    span = max(r["minutes"] for r in rows) or 1
    draw.line((left, top, left, bottom, width - 10, bottom), fill="black")
    for frac in (0, 0.5, 1):
        y = bottom - frac * (bottom - top)
        draw.text((5, y - 6), f"{frac:.0%}", fill="black")
    draw.text((width - 130, bottom + 8), f"training minutes (0-{span:.0f})", fill="black")
    for key, color in (("accuracy", "black"), ("single", (40, 110, 200)), ("pair", (200, 60, 40))):
        points = [(left + r["minutes"] / span * (width - 60), bottom - r[key] * (bottom - top)) for r in rows]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.text((width - 70, top + 14 * ("accuracy", "single", "pair").index(key)), key, fill=color)
    image.save(path)
