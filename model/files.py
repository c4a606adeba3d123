"""Reading a weight file safely: safetensors memory-mapped, .ckpt/.pt through
torch.load(weights_only=True) (a file that holds Python objects is refused, never unpickled), and
one clear line for a file that is damaged, empty, of another kind or not a state dict at all.

    from model.files import read_state_dict
    state = read_state_dict("v1-5-pruned-emaonly.safetensors")   # {key: tensor}
"""
import os
import pickle
import pickletools
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """The file is missing, unreadable, or not an SD 1.x / 2.x checkpoint."""


class _Ignored:
    """Stands in for non-tensor objects pickled into .ckpt files (pytorch-lightning callbacks,
    numpy scalars): never executed, only lets weights_only unpickling go past them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


ZIP_MAGIC = b"PK\x03\x04"   # torch.save's format; the legacy one is a bare pickle (0x80 0x02)
NON_TENSOR = ("the file holds non-tensor Python objects{} and was refused for safety, since "
              "loading them could run arbitrary code; use the .safetensors version of this "
              "checkpoint instead")


def _torch_load(path):
    """A .ckpt / .pt file -> the object it holds, read with weights_only=True: none of it runs."""
    head = _head(path)
    zipped = head.startswith(ZIP_MAGIC)
    try:   # only the zip format can be memory-mapped
        with warnings.catch_warnings():   # else torch's pickle-protocol note precedes our line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if zipped:   # non-tensor objects in the pickle, e.g. pytorch-lightning callbacks
            return _load_skipping_objects(path)
        error = e
    except Exception as e:   # on garbage torch's unpicklers raise anything, IndexError, KeyError...
        error = e
    raise CheckpointError(
        f"{path}: {_why_not_torch(path, head, os.path.getsize(path), error)}") from error


def _load_skipping_objects(path):
    """A zip .ckpt whose pickle holds non-tensor objects: loaded with each of their classes replaced
    by an inert stub (_Ignored), so none of their code runs. Objects a stub cannot stand in for (a
    dict subclass, say) make the file refused."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError) as e:   # the pickle itself is damaged
        raise CheckpointError(f"{path}: {_damaged(os.path.getsize(path), e)}") from e
    stubs = [(type(n.rsplit(".", 1)[-1], (_Ignored,), {}), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        problem = (NON_TENSOR.format(f" ({', '.join(names)})") if names
                   else _damaged(os.path.getsize(path), e))
        raise CheckpointError(f"{path}: {problem}") from e
    print(f"{path}: ignoring pickled non-tensor objects ({', '.join(names)})")
    return state


def _why_not_torch(path, head, size, error):
    """What is wrong with a file torch.load could not read, judged by its first bytes and error."""
    found = _not_weights(head, size)
    if found:
        return f"not a PyTorch checkpoint: it is {found}"
    if not head.startswith((ZIP_MAGIC, b"\x80")):
        return f"not a PyTorch zip or pickle checkpoint (first bytes: {head[:16]!r})"
    # A bare pickle that refers to code (torch's legacy format opens with a pickled magic number):
    # named from its opcodes, as torch's safe reader fails on such a file before it sees a global.
    if foreign := [name for name in _pickled_globals(path) if not name.startswith(TORCH_GLOBALS)]:
        return NON_TENSOR.format(f" ({', '.join(foreign)})")
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):   # legacy
        return NON_TENSOR.format("")
    return _damaged(size, error)


TORCH_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")   # in plain weight pickles


def _pickled_globals(path):
    """module.name of every class or function the (first) pickle in `path` refers to, read opcode
    by opcode with pickletools: nothing is imported or run. [] for a pickle that does not parse."""
    strings, found = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:   # damaged: pickletools raises ValueError, struct.error and others on garbage
        return []
    return found


def _damaged(size, error):
    return (f"cannot read this PyTorch checkpoint ({size} bytes): the file is incomplete or "
            f"damaged ({_first_sentence(error)}); download it again")


def _not_weights(head, size):
    """What a file that cannot hold weights is (empty, Git LFS pointer, HTML, text), or None."""
    if size == 0:
        return "an empty file (0 bytes)"
    text = _as_text(head)
    if text is None:
        return None
    if text.startswith("version https://git-lfs"):
        return ("a Git LFS pointer, not the weights (fetch the real file with `git lfs pull` in "
                "the repository it came from, or download it again)")
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed download: an error or login page saved in place of the file)"
    lines = text.strip().splitlines() or [""]
    return f"a text file ({size} bytes), starts with {lines[0][:60]!r}"


def _as_text(head):
    """`head` decoded as UTF-8 if it reads as text (printable characters, whitespace), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:   # not just a character cut in two by the end of `head`
            return None
        text = head[:e.start].decode("utf-8")
    return text if all(c.isprintable() or c.isspace() for c in text) else None


def _head(path, n=512):
    with open(path, "rb") as f:
        return f.read(n)


def _first_sentence(error):
    """The first sentence of an exception's message: the rest is usually advice for other cases."""
    return (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0].rstrip(".")


def read_state_dict(path):
    """A single checkpoint file -> flat {key: tensor} (a .ckpt's `state_dict` wrapper removed)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as e:
            found = _not_weights(_head(path), os.path.getsize(path))
            raise CheckpointError(f"{path}: not a valid .safetensors file: it is {found}" if found
                                  else f"{path}: not a valid .safetensors file ({e}); is the "
                                  "download complete, and is it really a safetensors file?") from e
    elif ext in (".ckpt", ".pt", ".pth", ".bin"):
        state = _torch_load(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise CheckpointError(f"{path}: unsupported file type {ext!r}; expected .safetensors, "
                              ".ckpt or a diffusers folder")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a flat dict of tensors (a state dict)")
    return state


