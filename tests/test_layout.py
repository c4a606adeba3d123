"""The dependency direction of shared/DESIGN.md, read from the source: prune/ and cache/ are
leaves, model/ knows no sampler or method, sampler/ knows no method (accel/ is where they meet),
the core (those and sample.py) imports neither tools/ nor lab/, and the research tools are clients of
the packages and of their shared kit (metrics, plots, cli, measure, shard), never of each other. The top
level is the design card plus tools/, accel/, lab/ and docs/."""
import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "sampler", "prune", "cache", "accel", "lab", "tools", "sample")
TOOLS = ("bench", "evaluate", "search")   # tools/ entry points; metrics, plots, cli, measure, shard... are their kit


def project_imports(path, level=0):
    """The project packages a file imports (`level` 1: the tools/ modules it imports, by name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and level:
            names = [f"tools.{node.module or alias.name}" for alias in node.names]
        else:
            continue
        if level:
            found |= {name.split(".")[1] for name in names if name.startswith("tools.") and name.count(".") >= 1}
        else:
            found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


ALLOWED = {"prune": {"prune"}, "cache": {"cache"}, "model": {"model"},
           "sampler": {"sampler", "model"}, "accel": {"accel", "sampler", "model", "prune", "cache"},
           "lab": {"lab", "model", "sampler"},
           "tools": {"tools", "accel", "sampler", "model", "prune", "cache", "lab"},
           "sample": {"accel", "cache", "model", "prune", "sampler"}}   # the core stands alone: no tools/, no lab/


@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_import_only_downwards(package):
    for path in sorted((ROOT / package).glob("*.py")) or [ROOT / f"{package}.py"]:
        assert project_imports(path) <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {project_imports(path)}"


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_do_not_import_each_other(tool):
    used = project_imports(ROOT / "tools" / f"{tool}.py", level=1)
    assert not used & set(TOOLS), f"tools/{tool}.py imports {used & set(TOOLS)}"


def test_top_level_is_the_design_card():
    shown = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in ("runs", "outputs")
             and not p.name.endswith((".egg-info", "__pycache__"))}
    card = {"model", "sampler", "prune", "cache", "tests", "sample.py", "README.md", "requirements.txt"}
    extra = {"accel", "tools", "lab", "docs", "pyproject.toml", "pytest.ini", "requirements-test.txt",
             "requirements-eval.txt", "requirements-search.txt"}
    assert card <= shown and shown <= card | extra, f"not on the design card: {sorted(shown - card - extra)}"


def test_no_file_over_400_lines():
    long = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
            if "runs" not in p.parts and len(p.read_text().splitlines()) > 400]
    assert not long, f"over 400 lines: {long}"


def test_the_core_wraps_at_100_columns():
    """The files a teacher projects fit a narrow window (the tools and the lab wrap at ruff's 120)."""
    core = [ROOT / "sample.py", *(p for name in ("model", "sampler", "prune", "cache", "accel")
                                  for p in sorted((ROOT / name).glob("*.py")))]
    wide = [f"{p.relative_to(ROOT)}:{i}" for p in core
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 100]
    assert not wide, f"over 100 columns: {wide[:10]}{' ...' if len(wide) > 10 else ''}"


def test_sample_py_runs_with_tools_and_lab_deleted(tmp_path, tokenizer_dir):
    """A copy of the tree without tools/ and lab/: sample.py still draws, on random weights and from a
    checkpoint file."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import save_file

    from conftest import layout_shapes, random_state
    from model import TINY
    for name in ("model", "sampler", "prune", "cache", "accel"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "sample.py", tmp_path)
    save_file(random_state(layout_shapes(TINY)), str(tmp_path / "tiny.safetensors"))
    for source in (["--random-weights", "tiny"], ["--ckpt", "tiny.safetensors", "--tokenizer", tokenizer_dir]):
        done = subprocess.run([sys.executable, "sample.py", *source, "--prompt", "a red cube", "--steps", "2",
                               "--H", "64", "--W", "64", "--outdir", "out"], cwd=tmp_path, capture_output=True,
                              text=True, env={"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]
    done = subprocess.run([sys.executable, "sample.py", "--random-weights", "lab", "--prompt", "a"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "lab-sd.safetensors" in done.stderr


# What a student reads to follow one idea, as (file, function) pairs, and its budget in lines and files.
# A renamed or moved function fails the test, so the lists stay the true reading paths.
SELECTION = [("prune/tokens.py", name) for name in (   # the cell selection SiTo and DaTo share
    "normalized", "noise", "per_cell_argmax", "cell_indices", "complement", "gather_rows",
    "split_by_similarity", "TokenPlan.__init__", "TokenPlan.prune", "TokenPlan.recover", "TokenPlan.__iter__")]
READING = {
    "SiTo's selection and recovery": (150, 3, [
        ("prune/sito.py", "SiTo.plan"), *SELECTION, ("model/unet.py", "run_with_plan"),
        ("model/unet.py", "BasicTransformerBlock.forward")]),
    # the sampler's own code, the guided model call a black box as in k-diffusion's 24-line sampler
    "one DPM++(2M) step": (60, 2, [
        ("sampler/dpmpp.py", "dpmpp_2m_steps"), ("sampler/dpmpp.py", "update"), ("sampler/dpmpp.py", "log_snr"),
        ("sampler/dpmpp.py", "alpha_sigma"), ("sampler/loop.py", "guided_sum")]),
    "one PLMS step": (60, 3, [
        ("sampler/plms.py", "plms_steps"), ("sampler/schedule.py", "ddim_update"),
        ("sampler/loop.py", "guided_sum")]),
    # a per-call depth vector, the features kept and reused, DaTo's dynamics and its selection
    "DaTo's cache and pruning schedule": (250, 5, [
        ("cache/schedule.py", "from_dato"), ("cache/schedule.py", "CacheSchedule.depths_for"),
        ("cache/schedule.py", "explicit_depths"), ("accel/run.py", "Acceleration.depths"),
        ("accel/run.py", "Acceleration.plans"), ("accel/run.py", "AcceleratedRun.begin_call"),
        ("accel/run.py", "AcceleratedRun.remember"), ("accel/run.py", "AcceleratedRun.token_plans"),
        ("model/unet.py", "UNetModel.forward"), ("prune/dato.py", "DaTo.plan"),
        ("prune/dato.py", "DaToRun.begin_call"), ("prune/dato.py", "DaToRun.plan"),
        ("prune/dato.py", "dynamics_map"), ("prune/dato.py", "pooled"), *SELECTION]),
    # every function that reads or passes the ratio's value, from --prune-ratio to the k tokens removed
    "the pruning ratio, flag to tokens": (None, 6, [
        ("sample.py", "method_settings"), ("prune/__init__.py", "token_method"),
        ("prune/method.py", "CellMethod.ratio_at"), ("accel/run.py", "Acceleration.plans"),
        ("accel/run.py", "AcceleratedRun.token_plans"), ("prune/method.py", "TokenRun.plan"),
        ("prune/sito.py", "SiTo.plan"), ("prune/tokens.py", "split_by_similarity")]),
}


def spans(path):
    """{qualified name: (first line, last line)} of the functions and classes of a file."""
    found = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                first = min([d.lineno for d in child.decorator_list] + [child.lineno])
                found[prefix + child.name] = (first, child.end_lineno)
                walk(child, f"{prefix}{child.name}.")
    walk(ast.parse((ROOT / path).read_text()), "")
    return found


@pytest.mark.parametrize("idea", list(READING))
def test_reading_paths_stay_short(idea):
    most_lines, most_files, path = READING[idea]
    lines = 0
    for file, name in path:
        assert name in spans(file), f"{idea}: {file} has no {name}; update READING"
        first, last = spans(file)[name]
        lines += last - first + 1
    files = {file for file, _ in path}
    assert len(files) <= most_files, f"{idea}: {len(files)} files {sorted(files)}"
    assert most_lines is None or lines <= most_lines, f"{idea}: {lines} lines"
