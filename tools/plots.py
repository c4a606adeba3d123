"""The tools' pictures: evaluate.py's grid of methods x prompts (pillow), its quality against MAC ratio
and search.py's held-out Pareto set (matplotlib, an extra of the tools: pip install -r
requirements-eval.txt; pymoo brings it too)."""
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
        lines = [spec[k:k + label // 6 - 1] for k in range(0, len(spec), label // 6 - 1)]   # 6 px a character
        for k, line in enumerate(lines):   # a long spec (a schedule file's path) wraps inside the label column
            draw.text((4, band + i * side + side // 2 - 6 * len(lines) + 12 * k), line, fill="black")
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


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    return plt


def label_points(ax, points, fontsize=7):
    """Annotate (x, y, text, color) points, each label at the first of a few offsets around its point
    whose box overlaps no label placed before it and no point (else the first)."""
    from matplotlib.transforms import Bbox  # matplotlib is an optional extra: imported where it is used
    offsets = [(4, 3), (4, -10), (-6, 6), (-6, -12), (8, 10), (8, -16), (-10, 14), (-10, -20)]
    renderer = ax.figure.canvas.get_renderer()
    placed = []   # label boxes so far, and every marker's (a label never covers a point)
    for x, y, _, _ in points:
        px, py = ax.transData.transform((x, y))
        placed.append(Bbox.from_extents(px - 3, py - 3, px + 3, py + 3))
    for x, y, text, color in points:
        for dx, dy in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                                color=color, ha="left" if dx > 0 else "right")
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        else:   # crowded everywhere: the first offset, over whatever is there
            dx, dy = offsets[0]
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                                color=color, ha="left")
            box = label.get_window_extent(renderer)
        placed.append(box)


def draw_pareto(pareto, results, shown, label, value, path):
    """search.py --report: held-out `label` (value(entry)) against MAC ratio of the searched points (red,
    numbered as in pareto.json) beside the baseline and the presets in `shown` (blue)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    searched = [(p["heldout"]["mac_ratio"], value(p["heldout"]), f"#{k}", "tab:red")
                for k, p in enumerate(pareto["points"]) if p.get("heldout")]
    known = [(results[n]["mac_ratio"], value(results[n]), n, "tab:blue") for n in ("baseline", *shown) if n in results]
    plain = [(r["mac_ratio"], value(r), spec.partition("@")[2], "tab:gray") for spec, r in results.items()
             if spec.startswith("baseline@")]   # the plain runs of other samplers and step counts, if evaluated
    for group, name in ((searched, "searched (pareto.json#k)"), (known, "baseline and presets"),
                        (plain, "plain runs (SAMPLER:STEPS)")):
        if group:
            ax.plot([p[0] for p in group], [p[1] for p in group], "o", color=group[0][3], ms=4, label=name)
    ax.set_xscale("log")   # the plain runs crowd the low end
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("MAC ratio (the baseline's UNet MACs / the schedule's)")
    ax.set_ylabel(f"held-out {label}")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.1%}"))   # the points lie a few % apart
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    label_points(ax, sorted(searched + known + plain))
    fig.savefig(path, dpi=130, bbox_inches="tight")   # labels past the axes stay in
    plt.close(fig)


def draw_tradeoff(results, methods, path):
    """Quality against MAC ratio (matplotlib): the plain runs of each sampler (methods without acceleration)
    as one line per sampler, labelled with their step counts; accelerated methods as labelled black squares."""
    plt = pyplot()
    axes = quality_axes(results)
    fig, panels = plt.subplots(1, max(len(axes), 1), figsize=(6.5 * max(len(axes), 1), 5), squeeze=False)
    squares_of = {}   # the accelerated methods of each panel, labelled once the layout is final
    for (key, label), ax in zip(axes, panels[0], strict=False):
        ladders, squares = {}, squares_of.setdefault(key, [])
        for spec, r in results.items():
            value, interval = cell(r, key)
            if value is None:
                continue
            if methods[spec].accel is None:
                ladders.setdefault(methods[spec].sampler, []).append((r["mac_ratio"], value, interval, r["steps"]))
                continue
            ax.plot(r["mac_ratio"], value, "s", color="black", ms=4)
            squares.append((r["mac_ratio"], value, spec, "black"))
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
    for (key, _), ax in zip(axes, panels[0], strict=False):
        label_points(ax, sorted(squares_of[key]), fontsize=6)
    fig.savefig(path, dpi=130, bbox_inches="tight")   # labels past the axes stay in
    plt.close(fig)


def draw_speedups(results, path):
    """bench.py --plot: the speed-up of each method against the baseline as horizontal bars, one panel per
    attention backend ({backend: {method: row with "speedup"}})."""
    plt = pyplot()
    fig, panels = plt.subplots(1, len(results), figsize=(5.5 * len(results), 0.35 * max(map(len, results.values()))
                                                         + 1.2), squeeze=False, sharex=True)
    for (attention, rows), ax in zip(results.items(), panels[0], strict=True):
        names, values = list(rows), [r["speedup"] for r in rows.values()]
        bars = ax.barh(names, values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=7, padding=2)
        ax.axvline(1, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{attention} attention", fontsize=9)
        ax.set_xlabel("speed-up against the baseline (UNet time, median)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")   # labels past the axes stay in
    plt.close(fig)
