"""Image-quality metrics for evaluate.py, computed batch by batch so that any number of images streams
through, and combined in batch order so that a sharded run gives the numbers of a one-process run.

    scorer = Scorer.open(prompts, baseline=True, lab_features="lab/lab-features.safetensors", ...)
    part = scorer.score(images, prompts, baseline_images)     # one batch: per-image values and features
    result = scorer.summarize(parts, prompts, reference)       # parts in batch order -> results.json entry

What each metric is and where its weights come from:
- accuracy: the lab checker (lab captions only), overall and per kind, with 95% bootstrap intervals.
- psnr (dB), ssim, lpips: against the baseline image of the same prompt and seed (torchmetrics). LPIPS
  needs torchvision's AlexNet weights in torch's hub cache (--lpips; see LPIPS_WEIGHTS).
- clip_score: 100 * cos(image, text) of transformers' CLIPModel from --clip DIR_OR_ID, its processor fed
  PIL images (0-255 pixels, which it rescales as CLIP expects).
- fid / fid_vs_baseline: Fréchet distance in Inception-v3 pool features (torchmetrics with torch-fidelity's
  FID network) from --inception FILE (pt_inception-2015-12-05-6726825d.pth), against a reference set
  (--fid-ref) and against the baseline images (SADA's protocol).
- fd_lab / fd_lab_vs_baseline: the same Fréchet distance in the lab feature network's space
  (lab/features.py), for lab captions; the reference is the lab generator's own scenes for the same
  captions. Not an FID: its numbers compare methods on the lab model, nothing else.
The torchmetrics metrics accumulate in float64 sums; a Fréchet distance from 256 images is biased
upwards (compare methods at the same n, never against published FIDs).
"""
import importlib.util
import os
import pickle
from dataclasses import dataclass, field

import torch
from torch import nn

from lab.check import check, summary
from lab.scenes import parse
from sampler.generate import from_pil

INTERVAL_RESAMPLES = 2000
PER_IMAGE = ("correct", "psnr", "ssim", "lpips", "clip_score")   # the values Scorer.score lists image by image
LPIPS_WEIGHTS = "alexnet-owt-7be5be79.pth"   # torchvision's AlexNet, which LPIPS (alex) builds on


def bootstrap_interval(correct, seed=0):
    """95% percentile bootstrap interval of the mean of 0/1 outcomes."""
    values = torch.tensor(correct, dtype=torch.float64)
    picks = torch.randint(len(values), (INTERVAL_RESAMPLES, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[picks].mean(dim=1)
    return [means.quantile(0.025).item(), means.quantile(0.975).item()]


def is_caption(prompt):
    try:
        parse(prompt)
    except ValueError:
        return False
    return True


def is_lab(prompts):
    return all(map(is_caption, prompts))


def check_captions(prompts, source):
    """Prompts that mix lab captions with other lines are refused, as lab.check refuses a captions.txt with
    a line that is no caption: one typo would otherwise drop the lab metrics (accuracy, lab FD) of the
    whole run unannounced. Prompts with no lab caption (COCO's) are measured without them, said once."""
    other = [k for k, prompt in enumerate(prompts) if not is_caption(prompt)]
    if other and len(other) < len(prompts):
        k = other[0]
        raise ValueError(f"{source}: prompt {k + 1}, {prompts[k]!r}, is not a lab caption (lab/scenes.py's grammar) "
                         f"but {len(prompts) - len(other)} others are; the lab metrics (accuracy, lab FD) need every "
                         "prompt to be one: correct it, or give a file without lab captions")
    if other:
        print(f"{source}: not lab captions ({prompts[0]!r}), so accuracy and lab FD are not measured")


def mcnemar(correct, reference):
    """Exact McNemar test of paired 0/1 outcomes on the same images: wins (right where the reference is
    wrong), losses (the reverse) and the two-sided p-value of the binomial test of wins among the
    discordant pairs at 1/2 (scipy). p = 1 when no pair differs."""
    from scipy.stats import binomtest
    wins = sum(1 for a, b in zip(correct, reference, strict=True) if a and not b)
    losses = sum(1 for a, b in zip(correct, reference, strict=True) if b and not a)
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p": p}


def paired(results, reference, method, kind=None):
    """McNemar's test of `method` against `reference`, two entries of one evaluate.py results.json (the
    same images), over all captions or over one kind ("single", "pair")."""
    a, b = results[method]["verdicts"], results[reference]["verdicts"]
    if kind is not None:
        images = results[method]["by_kind"][kind]["images"]
        a, b = [a[i] for i in images], [b[i] for i in images]
    return mcnemar(a, b)


def lab_accuracy(correct, prompts, reference=None):
    """Accuracy of the checker's verdicts (one per prompt) overall, per kind and per relation; with the
    reference's verdicts on the same images (the baseline's), McNemar's test against them ("vs_baseline").
    The verdicts (0/1 per image) and each kind's image indices are kept, so that any two methods of one
    run can be paired later (paired())."""
    rows = [{"caption": c, "correct": ok} for c, ok in zip(prompts, correct, strict=True)]
    report = summary(rows)
    result = {"accuracy": report["accuracy"], "accuracy_ci": bootstrap_interval(correct),
              "verdicts": [int(ok) for ok in correct], "by_kind": {}}
    if reference is not None:
        result["vs_baseline"] = mcnemar(correct, reference)
    kinds = [parse(c).kind for c in prompts]
    for kind, entry in report["by_kind"].items():
        picked = [i for i, k in enumerate(kinds) if k == kind]
        if picked:
            result["by_kind"][kind] = {**entry, "accuracy_ci": bootstrap_interval([correct[i] for i in picked]),
                                       "images": picked}
            if reference is not None:
                result["by_kind"][kind]["vs_baseline"] = mcnemar([correct[i] for i in picked],
                                                                 [reference[i] for i in picked])
    result["by_relation"] = report["by_relation"]
    return result


def fidelity(x, y):
    """Per-image PSNR (dB; an identical image counts as 100 dB rather than infinity) and SSIM of uint8
    images x against y, [B, 3, H, W] each."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    x, y = x.double() / 255, y.double() / 255
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=100.0)
    ssim = structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, reduction="none")
    return psnr.tolist(), ssim.tolist()


class Precomputed(nn.Module):
    """The identity as torchmetrics' FID feature extractor: features are computed batch by batch (and on
    other processes), then fed to the metric in batch order."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, features):
        return features


def load_stats(path, dims):
    """(name, mu, sigma) of an .npz of reference statistics (pytorch-fid / clean-fid layout: mu, sigma),
    matched to the feature network whose dimension it has; dims = {name: dim}."""
    import numpy as np
    try:
        stats = np.load(path)   # allow_pickle stays off: an .npy / pickle that holds objects is refused
    except (OSError, ValueError, EOFError):   # numpy's own text would suggest unpickling: not said here
        raise ValueError(f"--fid-ref {path!r} is not an .npz of statistics; pass an .npz of mu and sigma or a "
                         "folder of reference images") from None
    if not hasattr(stats, "files"):
        raise ValueError(f"--fid-ref {path!r} is a single array, not an .npz of mu and sigma; pass such an .npz or a "
                         "folder of reference images")
    with stats as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"--fid-ref {path!r} has no 'mu' and 'sigma' arrays (the pytorch-fid / clean-fid "
                             "statistics layout); pass a folder of reference images instead")
        mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
    names = [name for name, dim in dims.items() if dim == mu.numel()]
    if not names:
        raise ValueError(f"--fid-ref {path!r} holds {mu.numel()}-dimensional statistics, which match none of the "
                         f"feature networks in use ({', '.join(f'{n}: {d}' for n, d in dims.items()) or 'none'})")
    return names[0], mu, sigma


def set_reference(metric, mu, sigma, n=2):
    """Make `metric`'s reference the Gaussian (mu, sigma): the sums from which it recovers exactly these."""
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)


def open_lpips(device):
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not os.path.exists(os.path.join(hub, LPIPS_WEIGHTS)):
        raise ValueError(f"--lpips needs torchvision's AlexNet weights {LPIPS_WEIGHTS} in {hub} (torch's hub "
                         "cache, set by $TORCH_HOME); copy the file there, or leave --lpips out")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True,
                                                     sync_on_compute=False).to(device)   # per process, per batch
    except (ImportError, RuntimeError) as e:   # no torchvision, or one built for another torch
        raise ValueError(f"--lpips needs torchvision built for your torch ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None


class ClipScore:
    """CLIP score, 100 * max(cos(image embedding, caption embedding), 0) per image (Hessel et al. 2021 with
    torchmetrics' scale). Written here because torchmetrics' CLIPScore (1.9) breaks on transformers 5,
    whose get_image_features returns an output object; the processor gets PIL images, 0-255 pixels that
    it rescales and normalises as CLIP expects (DaTo's script fed [0, 1] floats, which it rescales again)."""

    def __init__(self, name, device):
        from transformers import CLIPModel, CLIPProcessor
        try:
            self.model = CLIPModel.from_pretrained(name).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(f"--clip {name!r}: no CLIP model there ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "give a folder saved by CLIPModel/CLIPProcessor.save_pretrained or a hub id, e.g. "
                             "openai/clip-vit-large-patch14") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts):
        inputs = self.processor(text=list(prompts), images=images, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.model.config.text_config.max_position_embeddings)
        out = self.model(**inputs.to(self.device))
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float())
        return (100 * cosine).clamp(min=0).tolist()


def open_inception(path, device):
    if not os.path.isfile(path):
        raise ValueError(f"--inception {path!r} does not exist (torch-fidelity's FID Inception weights, "
                         "pt_inception-2015-12-05-6726825d.pth)")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' NoTrainInceptionV3 is torch-fidelity's network)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except (ImportError, RuntimeError) as e:   # no torch-fidelity, or a torchvision built for another torch
        raise ValueError(f"--inception needs torch-fidelity and a torchvision built for your torch "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); pip install torch-fidelity") from None
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=path)
    except (RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"--inception {path!r} is not the FID Inception's state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    net.num_features = 2048
    return net.to(device)


@dataclass
class Scorer:
    """What is measured, with every network loaded; `open` fails before anything is generated."""
    lab: bool                                      # lab captions: the checker's accuracy
    features: dict = field(default_factory=dict)   # "fd_lab" / "fid" -> network: uint8 images -> [B, D]
    lpips: object = None
    clip: object = None
    device: torch.device = torch.device("cpu")

    @classmethod
    def open(cls, prompts, baseline, lab_features=None, inception=None, lpips=False, clip=None, device="cpu"):
        device = torch.device(device)
        wanted = baseline or lab_features or inception or lpips or clip
        if wanted and importlib.util.find_spec("torchmetrics") is None:
            raise ValueError("the metrics need torchmetrics: pip install -r requirements-eval.txt")
        if wanted and importlib.util.find_spec("scipy") is None:   # McNemar's test
            raise ValueError("the paired test needs scipy: pip install -r requirements-eval.txt")
        if lpips and not baseline:
            raise ValueError("--lpips compares each image with the baseline's: add baseline to --methods")
        lab = is_lab(prompts)
        scorer = cls(lab=lab, device=device)
        if lab and lab_features:
            from lab.features import load
            if not os.path.isfile(lab_features):
                raise ValueError(f"--lab-features {lab_features!r} does not exist (train one with python -m "
                                 "lab.features --out FILE)")
            scorer.features["fd_lab"] = load(lab_features).to(device)
        if inception:
            scorer.features["fid"] = open_inception(inception, device)
        if lpips:
            scorer.lpips = open_lpips(device)
        if clip:
            scorer.clip = ClipScore(clip, device)
        return scorer

    @torch.no_grad()
    def features_of(self, images):
        """{name: features [B, D]} of images (PIL, or uint8 [B, 3, H, W]) under every feature network."""
        x = (images if torch.is_tensor(images) else from_pil(images)).to(self.device)
        return {name: net(x).float().cpu() for name, net in self.features.items()}

    @torch.no_grad()
    def score(self, images, prompts, baseline=None):
        """One batch of one method: per-image values (lists) and features."""
        x = from_pil(images)
        part = {"features": self.features_of(x)}
        if self.lab:
            part["correct"] = [check(image, c).correct for image, c in zip(images, prompts, strict=True)]
        if baseline is not None:
            y = from_pil(baseline)
            part["psnr"], part["ssim"] = fidelity(x, y)
            if self.lpips is not None:
                self.lpips.reset()
                self.lpips.update(x.to(self.device).float() / 255, y.to(self.device).float() / 255)
                part["lpips"] = self.lpips.compute().reshape(-1).tolist()
        if self.clip is not None:
            part["clip_score"] = self.clip(images, prompts)
        return part

    def summarize(self, parts, prompts, reference=None, baseline=None, baseline_correct=None):
        """The results.json entry of one method from its parts in batch order. `reference` and `baseline`
        are {feature name: [features [B, D] in batch order]} (None: that distance is not computed);
        `baseline_correct`: the baseline's checker verdicts on the same prompts, for McNemar's test."""
        values = {key: [v for part in parts for v in part[key]] for key in PER_IMAGE if key in parts[0]}
        entry = {}
        if self.lab:
            entry.update(lab_accuracy(values.pop("correct"), prompts, baseline_correct))
        for key, per_image in values.items():
            entry[key] = sum(per_image) / len(per_image)
        for name in self.features:
            ours = [part["features"][name] for part in parts]
            for suffix, other in (("", reference), ("_vs_baseline", baseline)):
                if other is not None and name in other:
                    entry[name + suffix] = frechet_distance(other[name], ours)
        return entry


def frechet_distance(real, fake):
    """Fréchet distance between two sets given as lists of feature batches (or (mu, sigma) for `real`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    # never synced across processes: evaluate.py gathers the features itself, so that the sums run in
    # batch order whatever the process count
    metric = FrechetInceptionDistance(feature=Precomputed(fake[0].shape[1]), sync_on_compute=False)
    if isinstance(real, tuple):
        set_reference(metric, *real)
    else:
        for batch in real:
            metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    return metric.compute().item()


def paired_text(test):
    """McNemar's result as a cell: wins and losses against the baseline on the same images, and p."""
    return f"+{test['wins']} −{test['losses']}, p {test['p']:.2g}"


COLUMNS = [  # markdown tables: (key, heading, format); a column shows when any method has the value
    ("accuracy", "lab accuracy", "{:.1%}"), ("vs_baseline", "vs baseline (McNemar)", paired_text),
    ("single", "one object", "{:.1%}"), ("single_vs_baseline", "one object vs baseline", paired_text),
    ("fd_lab", "lab FD", "{:.2f}"),
    ("fd_lab_vs_baseline", "lab FD vs baseline", "{:.2f}"), ("fid", "FID", "{:.2f}"),
    ("fid_vs_baseline", "FID vs baseline", "{:.2f}"), ("clip_score", "CLIP score", "{:.2f}"),
    ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("lpips", "LPIPS", "{:.3f}"),
    ("mac_ratio", "MAC ratio", "{:.2f}x"), ("speedup", "speed-up", "{:.2f}x")]


def cell(entry, key):
    """(value, its 95% interval or None) of a table column."""
    if key == "single":
        single = entry.get("by_kind", {}).get("single")
        return (single["accuracy"], single["accuracy_ci"]) if single else (None, None)
    if key == "single_vs_baseline":
        return entry.get("by_kind", {}).get("single", {}).get("vs_baseline"), None
    return entry.get(key), entry.get(key + "_ci")


def markdown(results):
    """{method: results.json entry} as a markdown table (evaluate.py's results.md, search.py --ship)."""
    columns = [c for c in COLUMNS if any(cell(r, c[0])[0] is not None for r in results.values())]
    lines = ["| method | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for spec, r in results.items():
        cells = []
        for key, _, form in columns:
            value, interval = cell(r, key)
            text = "-" if value is None else form(value) if callable(form) else form.format(value)
            cells.append(text if interval is None else f"{text} ({interval[0]:.1%}-{interval[1]:.1%})")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """python -m tools.metrics RESULTS.json REFERENCE METHOD [METHOD ...]: McNemar's test of each method's checker
    verdicts against the reference's on the same images, over all captions and per kind, from one
    evaluate.py run's results.json (any two of its methods: e.g. an accelerated run against a plain
    short run)."""
    from tools.cli import Parser
    from tools.results import paired_results
    p = Parser(prog="python -m tools.metrics", description=main.__doc__)
    p.add_argument("results", help="evaluate.py's results.json")
    p.add_argument("reference", help="the method to compare against (a --methods spec of that run)")
    p.add_argument("methods", nargs="+", help="the methods to compare with it")
    args = p.parse_args(argv)
    if os.path.isdir(args.results):
        p.error(f"{args.results} is a folder: give the results.json inside it")
    try:
        results = paired_results(args.results, [args.reference, *args.methods])
    except ValueError as e:
        p.error(str(e))
    kinds = list(results[args.reference]["by_kind"])
    print(f"against {args.reference}: accuracy, then +wins −losses, p (McNemar), over all captions and per kind")
    for spec in args.methods:
        cells = []
        for kind in (None, *kinds):
            entry = results[spec] if kind is None else results[spec]["by_kind"][kind]
            test = paired(results, args.reference, spec, kind)
            cells.append(f"{kind or 'all'} {entry['accuracy']:.1%} ({paired_text(test)})")
        print(f"{spec}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    main()
