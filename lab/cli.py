"""What the command lines of the lab tools share besides sampler/cli.py's Parser and set_threads: no empty file
or folder flag (path_flag), JSON files replaced whole or not at all (write_json), and the folders: lab.scenes
writes a data set into a new or empty one, lab.check reads one (PNGs in numeric order, captions.txt
beside them), and neither writes over a file. Every problem with a folder is a FolderError: one line
that says what to do."""
import argparse
import json
import os
import re
import tempfile


def path_flag(text):
    """The argparse type of every file and folder flag: an empty one (an unset shell variable, say) names
    nothing, and each command would read it as something else (the current folder, no report at all)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a file or folder name")
    return text


class FolderError(ValueError):
    """Why a folder or file named on a command line cannot be used, in one line that says what to do."""


def save_new(path, write):
    """write(file) into `path`, a new file (FileExistsError: nothing is overwritten), removed if it fails."""
    with open(path, "xb") as f:
        try:
            write(f)
        except BaseException:
            f.close()
            os.remove(path)
            raise


def write_json(path, data):
    """Replace `path` with `data` whole or not at all (an interrupted write leaves the old file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def prepare_out(out):
    """Make `out` a new or empty, writable folder (FolderError if it cannot be: nothing is written over)."""
    try:
        if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise FolderError(f"--out {out} {'holds files' if os.path.isdir(out) else 'is a file'}; choose a new "
                              "folder, or delete this one first (nothing is written over)")
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()     # a real write: os.access says yes to root where it fails
    except OSError as e:
        raise FolderError(f"--out {out} cannot be written ({e.strerror}); choose a folder you can write in") from None


def check_new_file(path, flag):
    """FolderError unless `path` (given as `flag`) is a new file in a folder that can be written: checked
    before the work that fills it."""
    if os.path.lexists(path):
        raise FolderError(f"{flag} {path} exists; choose another file or delete it (nothing is overwritten)")
    try:
        tempfile.TemporaryFile(dir=os.path.dirname(path) or ".").close()   # a real write: os.access lies to root
    except OSError as e:
        raise FolderError(f"{flag} {path} cannot be written ({e.strerror}); choose another place") from None


def list_pngs(folder):
    """The PNGs of a folder, numbered ones in numeric order first (png_order); FolderError if there are none."""
    if not os.path.isdir(folder):
        raise FolderError(f"{folder} {'is a file' if os.path.exists(folder) else 'is missing'}: give a folder of PNGs")
    names = [f for f in os.listdir(folder) if f.lower().endswith(".png")]
    if not names:
        raise FolderError(f"{folder} holds no PNG images: nothing to score")
    names.sort(key=png_order)
    return [os.path.join(folder, f) for f in names]


def png_order(name):
    """Sort key of a PNG's name: the numbered ones (ASCII digits, as sampler.generate.save_pngs and lab.scenes
    write them) by number first, then the others by name; str.isdigit would take '²' for a number int() refuses."""
    stem = name[:-4]
    return (0, int(stem), name) if re.fullmatch(r"[0-9]+", stem) else (1, 0, name)


def read_listing(listing, n):
    """The lines of a captions.txt for n PNGs; FolderError unless it is UTF-8 with n lines."""
    try:
        with open(listing, encoding="utf-8-sig") as f:     # -sig: an editor's byte-order mark is not in line 1
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise FolderError(f"{listing} is not UTF-8 (byte {e.start}); save it as UTF-8 text") from None
    if len(lines) != n:
        raise FolderError(f"{listing} has {len(lines)} lines for {n} PNGs; it needs one caption per PNG")
    return lines
