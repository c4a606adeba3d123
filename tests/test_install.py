"""`pip install -e .` as the README says, into a fresh virtual environment, then the README's generation API
snippet run as a script from a folder outside the tree: the packages import from anywhere, and nothing is
built into the checkout."""
import re
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_snippet():
    """The README's first python block after '## Generation API'."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index("## Generation API"):], re.S).group(1)


def test_the_api_snippet_runs_from_outside_the_tree_after_an_editable_install(tmp_path):
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = str(env / "bin" / "python")
    # the running interpreter's packages (torch, pip, setuptools, ...) are visible to it, so nothing is downloaded
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    outer = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    Path(purelib, "outer.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                   check=True, cwd=tmp_path)
    snippet = readme_snippet().replace('"lab/lab-sd.safetensors"', repr(str(ROOT / "lab" / "lab-sd.safetensors")))
    script = tmp_path / "elsewhere" / "api.py"
    script.parent.mkdir()
    script.write_text(snippet + "print(len(images), images[0].size)\n")
    done = subprocess.run([python, str(script)], cwd=script.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["1", "(128,", "128)"] and (script.parent / "outputs" / "00000.png").exists()
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True).stdout
    assert "egg-info" not in status and "build/" not in status
