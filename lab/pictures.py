"""lab.train's pictures: sample sheets with their captions (pillow), and the checker's accuracy
against training time (matplotlib, when installed)."""
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


def draw_curve(log_path, path):
    """Checker accuracy (all, one object, two objects) against training minutes, from log.jsonl.

    Drawn with matplotlib, the tools' plotting library; without it (a training-only install) the
    curve is skipped and False returned: log.jsonl holds the same numbers."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    minutes = [r["minutes"] for r in rows]
    for key, label in (("accuracy", "all captions"), ("single", "one object"), ("pair", "two objects")):
        ax.plot(minutes, [100 * r[key] for r in rows], "-o", ms=3, label=label)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("checker accuracy of the EMA model (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True
