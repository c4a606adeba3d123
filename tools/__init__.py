"""The research tools, clients of the generation API (sampler.generate) like sample.py: run each
from the project root as a module.

    python -m tools.bench      speed, MACs and memory of every method, against our baseline and diffusers
    python -m tools.evaluate   quality beside speed on the same images (lab checker, PSNR/SSIM/LPIPS, FD)
    python -m tools.search     DaTo's NSGA-II schedule search, writing schedule files
    python -m tools.metrics    paired comparisons of two methods of an evaluate.py run

metrics.py holds the metrics evaluate and search share, plots.py their pictures, cli.py the model
and sampling flags of every tool (sample.py's too), shard.py several processes on one job.
"""
