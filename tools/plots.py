"""evaluate.py's pictures: the grid of methods x prompts (pillow) and quality against MAC ratio
(matplotlib, an evaluate extra: pip install -r requirements-eval.txt)."""
from PIL import Image, ImageDraw

from tools.metrics import cell

GRID_COLUMNS = 6


def draw_grid(load, prompts, columns=GRID_COLUMNS, side=128, band=24, label=110):
    """Methods as rows, the first prompts as columns, captions above."""
    columns = min(columns, len(prompts))
    sheet = Image.new("RGB", (label + columns * side, band + len(load) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for j, prompt in enumerate(prompts[:columns]):
        words = prompt.split()
        draw.text((label + j * side + 2, 0), " ".join(words[:5]), fill="black")
        draw.text((label + j * side + 2, 11), " ".join(words[5:10]), fill="black")
    for i, (spec, images) in enumerate(load.items()):
        draw.text((4, band + i * side + side // 2 - 6), spec, fill="black")
        for j, image in enumerate(images[:columns]):
            sheet.paste(image.resize((side, side)), (label + j * side, band + i * side))
    return sheet


def quality_axes(results):
    """The plot's quality measures: [(key, label)] (one-object accuracy and lab FD for lab captions)."""
    first = next(iter(results.values()))
    if "by_kind" in first and "single" in first["by_kind"]:
        axes = [("single", "one-object accuracy (95% interval)")]
    elif "accuracy" in first:
        axes = [("accuracy", "lab accuracy (95% interval)")]
    else:
        axes = [(key, label) for key, label in (("fid", "FID (lower is better)"), ("psnr", "PSNR vs baseline (dB)"))
                if any(key in r for r in results.values())][:1]
    if any("fd_lab" in r for r in results.values()):
        axes.append(("fd_lab", "lab FD (lower is better)"))
    return axes


def draw_tradeoff(results, methods, path):
    """Quality against MAC ratio (matplotlib): the plain runs of each sampler (methods without acceleration)
    as one line per sampler, labelled with their step counts; accelerated methods as labelled black squares."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axes = quality_axes(results)
    fig, panels = plt.subplots(1, max(len(axes), 1), figsize=(6.5 * max(len(axes), 1), 5), squeeze=False)
    for (key, label), ax in zip(axes, panels[0], strict=False):
        ladders = {}
        for spec, r in results.items():
            value, interval = cell(r, key)
            if value is None:
                continue
            if methods[spec].accel is None:
                ladders.setdefault(methods[spec].sampler, []).append((r["mac_ratio"], value, interval, r["steps"]))
                continue
            ax.plot(r["mac_ratio"], value, "s", color="black", ms=4)
            ax.annotate(spec, (r["mac_ratio"], value), fontsize=6, xytext=(3, 2), textcoords="offset points")
        for sampler, points in sorted(ladders.items()):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            line, = ax.plot(xs, ys, "-o", ms=3, label=f"{sampler} (steps labelled)")
            for x, y, interval, steps in points:
                ax.annotate(str(steps), (x, y), fontsize=6, color=line.get_color(), xytext=(2, -8),
                            textcoords="offset points")
                if interval is not None:
                    ax.plot([x, x], interval, color=line.get_color(), alpha=0.3, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("MAC ratio (UNet MACs of the reference run / the method's)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ladders:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
