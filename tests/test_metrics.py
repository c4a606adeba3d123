"""metrics.py against independent computations: PSNR/SSIM (Wang et al. 2004), the Fréchet distance
(a symmetric square root instead of torchmetrics' eigenvalues of a product), CLIP score (transformers'
CLIPModel on PIL images, a tiny random CLIP written offline); the shipped lab feature network reads
scenes and its Fréchet distance grows with a degradation; metrics whose weights are missing say which
flag provides them."""
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import ImageFilter

from lab.features import accuracy, load, scenes
from lab.scenes import draw, layout, sample_captions, sample_description
from model.text import write_tokenizer
from sampler.generate import from_pil
from tools import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_FEATURES = os.path.join(ROOT, "lab", "lab-features.safetensors")


def reference_ssim(x, y, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM as Wang et al. (2004) define it: Gaussian-weighted local statistics, per channel, mean over
    the valid region (no padding)."""
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - window // 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).outer(g / g.sum()).expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, g, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = k1 ** 2, k2 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def test_psnr_and_ssim_equal_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(3, 3, 48, 48, generator=g) * 255).round()
    other = (base + 25 * torch.randn(base.shape, generator=g)).clamp(0, 255).round()
    psnr, ssim = metrics.fidelity(other.byte(), base.byte())
    x, y = other.double() / 255, base.double() / 255
    expected = 10 * torch.log10(1 / (x - y).pow(2).mean(dim=(1, 2, 3)))
    assert psnr == pytest.approx(expected.tolist(), rel=1e-6)
    assert ssim == pytest.approx(reference_ssim(x, y).tolist(), abs=2e-3)
    assert metrics.fidelity(base.byte(), base.byte())[0] == [100.0] * 3


def test_bootstrap_interval():
    assert metrics.bootstrap_interval([1] * 20) == [1.0, 1.0]
    lo, hi = metrics.bootstrap_interval([1, 0] * 200)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)


def reference_frechet(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), symmetric square roots by eigh."""
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ s_b @ root).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def exact_mcnemar_p(wins, losses):
    """Two-sided exact p of the binomial test at 1/2, by hand: twice the smaller tail, at most 1."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def test_mcnemar_counts_discordant_pairs_and_its_p_is_the_exact_binomial():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 60)
        a, b = [rng.random() < 0.8 for _ in range(n)], [rng.random() < 0.7 for _ in range(n)]
        test = metrics.mcnemar(a, b)
        pairs = list(zip(a, b, strict=True))
        assert test["wins"] == sum(x and not y for x, y in pairs)
        assert test["losses"] == sum(y and not x for x, y in pairs)
        assert test["p"] == pytest.approx(exact_mcnemar_p(test["wins"], test["losses"]), rel=1e-9)
    assert metrics.mcnemar([0] * 6, [1] * 6) == {"wins": 0, "losses": 6, "p": pytest.approx(1 / 32)}


def test_lab_accuracy_pairs_methods_per_kind_from_stored_verdicts():
    prompts = sample_captions(40, seed="pairs")
    rng = random.Random(1)
    verdicts = {name: [rng.random() < 0.6 for _ in prompts] for name in ("ref", "new")}
    results = {name: metrics.lab_accuracy(v, prompts) for name, v in verdicts.items()}
    with_ref = metrics.lab_accuracy(verdicts["new"], prompts, verdicts["ref"])
    assert metrics.paired(results, "ref", "new") == with_ref["vs_baseline"]
    for kind, entry in with_ref["by_kind"].items():
        assert metrics.paired(results, "ref", "new", kind) == entry["vs_baseline"]
        assert entry["n"] == len(entry["images"]) and sum(verdicts["new"][i] for i in entry["images"]) == \
            round(entry["accuracy"] * entry["n"])
    assert sorted(i for e in with_ref["by_kind"].values() for i in e["images"]) == list(range(40))


def test_frechet_distance_equals_an_independent_computation_in_any_batching():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(250, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g).double() + 0.3
    expected = reference_frechet(a, b)
    assert expected > 1
    assert metrics.frechet_distance([a], [b]) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(list(a.split(7)), list(b.split(16))) == pytest.approx(expected, rel=1e-6)
    stats = (a.mean(0), torch.cov(a.T))   # a reference given as statistics (an .npz of mu, sigma)
    assert metrics.frechet_distance(stats, list(b.split(16))) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance([a], [a]) == pytest.approx(0, abs=1e-6)


def test_reference_statistics_file_matches_a_feature_network_by_dimension(tmp_path):
    import numpy as np
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    name, mu, sigma = metrics.load_stats(str(tmp_path / "ref.npz"), {"fid": 2048, "fd_lab": 64})
    assert name == "fd_lab" and mu.shape == (64,) and sigma.shape == (64, 64)
    with pytest.raises(ValueError, match="match none"):
        metrics.load_stats(str(tmp_path / "ref.npz"), {"fid": 2048})
    np.savez(tmp_path / "bad.npz", mean=np.zeros(64))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.load_stats(str(tmp_path / "bad.npz"), {"fd_lab": 64})


def test_shipped_lab_feature_network_reads_fresh_scenes():
    net = load(LAB_FEATURES)
    right, error = accuracy(net, *scenes(256, "test/held-out"))
    assert right >= 0.95 and error < 3.0   # measured: 100%, 2.1 px (of 128)


def test_lab_frechet_distance_grows_with_blur():
    net = load(LAB_FEATURES)
    real, _, _ = scenes(192, "test/real")
    rng = random.Random("test/other")
    others = [draw(layout(sample_description(rng), rng)) for _ in range(192)]
    with torch.no_grad():
        features = [[net(real)]] + [[net(from_pil([im.filter(ImageFilter.GaussianBlur(r)) for im in others]))]
                                    for r in (0, 1.5, 3)]
    distances = [metrics.frechet_distance(features[0], f) for f in features[1:]]
    assert distances[0] < distances[1] < distances[2], distances
    assert distances[2] > 1.5 * distances[0]   # measured: 5.8 (another real set), 11.3 (blur radius 3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP with a byte-level tokenizer, saved as a --clip folder (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder = str(tmp_path_factory.mktemp("clip"))
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder, compact=True))
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(tokenizer=tokenizer, image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    prompts, images = clip_inputs()
    with torch.no_grad():   # a random CLIP's cosines have a random sign: make most of these positive,
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
        if F.cosine_similarity(out.image_embeds, out.text_embeds).mean() < 0:   # or the clamp hides them
            model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def clip_inputs():
    prompts = sample_captions(6, seed="clip")
    return prompts, [draw(layout(p, k)) for k, p in enumerate(prompts)]


def test_clip_score_equals_clip_on_pil_images(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor
    prompts, images = clip_inputs()
    scorer = metrics.Scorer.open(prompts, baseline=False, clip=tiny_clip)
    parts = [scorer.score(images[:4], prompts[:4]), scorer.score(images[4:], prompts[4:])]
    ours = scorer.summarize(parts, prompts)["clip_score"]
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():   # PIL images: the processor rescales 0-255 pixels itself
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    cosine = F.cosine_similarity(out.image_embeds, out.text_embeds)
    assert (cosine > 0).sum() >= 3
    assert ours == pytest.approx((100 * cosine).clamp(min=0).mean().item(), rel=1e-4)


def test_missing_weights_name_the_flag_that_provides_them(tmp_path, monkeypatch):
    prompts = sample_captions(2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="--lpips needs torchvision's AlexNet weights"):
        metrics.Scorer.open(prompts, baseline=True, lpips=True)
    with pytest.raises(ValueError, match="--inception .* does not exist"):
        metrics.Scorer.open(prompts, baseline=True, inception=str(tmp_path / "pt_inception.pth"))
    with pytest.raises(ValueError, match="--clip .*no CLIP model there"):
        metrics.Scorer.open(prompts, baseline=True, clip=str(tmp_path / "no-clip"))
    with pytest.raises(ValueError, match="--lab-features .* does not exist"):
        metrics.Scorer.open(prompts, baseline=True, lab_features=str(tmp_path / "none.safetensors"))


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "--threads must be >= 1"), (["--scenes", "3"], "--scenes must be >= 64"),
    (["--steps", "0"], "--steps must be >= 1"), (["--out", "README.md"], "README.md exists"),
    (["--out", "/no/such/folder/f.safetensors"], "its folder does not exist")])
def test_lab_features_refuses_bad_input_in_one_line_before_training(tmp_path, capsys, flags, message):
    from lab import features
    with pytest.raises(SystemExit):
        features.main(["--out", str(tmp_path / "f.safetensors"), *flags])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f.safetensors").exists()


def test_paired_test_command_refuses_what_is_not_a_results_file(tmp_path, capsys):
    verdicts = {"methods": {"baseline": {"verdicts": [1, 0, 1], "by_kind": {}},
                            "sito:0.5": {"verdicts": [1, 1], "by_kind": {}},
                            "text": {"verdicts": "101", "by_kind": {}}}}
    (tmp_path / "r.json").write_text(json.dumps(verdicts))
    (tmp_path / "cut.json").write_text('{"methods": {')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "methods.json").write_text('{"methods": [1, 2]}')
    cases = [([str(tmp_path / "none.json"), "baseline", "x"], "none.json cannot be read as JSON"),
             ([str(tmp_path), "baseline", "x"], "is a folder"),
             ([str(tmp_path / "cut.json"), "a", "b"], "cannot be read"),
             ([str(tmp_path / "list.json"), "a", "b"], "has no 'methods'"),
             ([str(tmp_path / "methods.json"), "a", "b"], "'methods' is not an object of method entries"),
             ([str(tmp_path / "r.json"), "baseline", "sito:0.5"], "not one 0/1 per image of the same run"),
             ([str(tmp_path / "r.json"), "baseline", "text"], "not one 0/1 per image"),
             ([str(tmp_path / "r.json"), "baseline", "tome"], "'tome' has no checker verdicts")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            metrics.main(argv)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def edited_results(tmp_path, name, edit):
    """A results.json of two methods' real entries (lab_accuracy on 6 lab captions), edited by `edit`."""
    prompts = sample_captions(6, seed="edited")
    verdicts = {"baseline": [1, 0, 1, 1, 0, 1], "sito:0.5": [1, 1, 0, 1, 0, 1]}
    results = {"methods": {m: metrics.lab_accuracy(v, prompts) for m, v in verdicts.items()}}
    edit(results["methods"])
    (tmp_path / name).write_text(json.dumps(results))
    return str(tmp_path / name)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["sito:0.5"].pop("by_kind"), "the by_kind of 'sito:0.5' is not an object of per-kind figures"),
    (lambda r: r["sito:0.5"].update(by_kind=[]), "the by_kind of 'sito:0.5' is not an object of per-kind figures"),
    (lambda r: r["sito:0.5"].pop("accuracy"), "the accuracy of 'sito:0.5' is not a number"),
    (lambda r: r["sito:0.5"]["by_kind"]["single"].pop("accuracy"), "by_kind.single.accuracy of 'sito:0.5'"),
    (lambda r: r["sito:0.5"]["by_kind"]["single"].update(images=[0, 7]), "not a split of its 6 images"),
    (lambda r: r["baseline"]["by_kind"].update(other={"accuracy": 0.0, "images": []}),
     "the kinds (by_kind) of 'sito:0.5' are not over the same images as those of 'baseline'"),
])
def test_paired_test_command_refuses_an_edited_results_file(tmp_path, capsys, edit, message):
    with pytest.raises(SystemExit):
        metrics.main([edited_results(tmp_path, "r.json", edit), "baseline", "sito:0.5"])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert metrics.main([edited_results(tmp_path, "ok.json", lambda r: None), "baseline", "sito:0.5"]) == 0
