"""Where the model runs: the device, the precision that suits it, and wall-clock timing that
counts a GPU's asynchronous work. Resolved once, before any weights are loaded.

Precision by default ("auto"): fp16 on CUDA and MPS; on a CPU, bf16 where it has native bf16
matrix units (AVX512-BF16 or AMX: bf16 matrix work about 4x faster than fp32 there), else fp32
(on AVX2-only CPUs bf16 is emulated and far slower than fp32).
"""
import time
import warnings

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def default_device():
    """The best device available: cuda, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(device):
    """A device name (None: the best available) -> torch.device, or ValueError naming the device
    when this machine does not have it."""
    name = default_device() if device is None else device
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device; "
                         "use cpu, cuda, cuda:N or mps") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device {name}: unsupported device type; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {name}: this machine has no CUDA GPU (or this torch build "
                             "has no CUDA); use the cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {name}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name}: MPS (Apple GPU) is not available here; "
                         "use the cpu")
    return dev


def native_bf16_cpu():
    """Whether this CPU has native bf16 matrix units (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype, device):
    """"auto" (or None) | "fp32" | "fp16" | "bf16" | a torch.dtype -> the torch.dtype to run in on
    `device`. Warns where an explicit choice is slow on this hardware."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; "
                             f"use one of {', '.join(DTYPE_CHOICES)}")
        chosen, explicit = dtype, True
    elif dtype is None or dtype == "auto":
        kind = torch.device(device).type
        if kind in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if native_bf16_cpu() else torch.float32
    elif dtype in DTYPES:
        chosen, explicit = DTYPES[dtype], True
    else:
        raise ValueError(f"dtype {dtype!r} is not a precision; "
                         f"choose one of {', '.join(DTYPE_CHOICES)}")
    if explicit and torch.device(device).type == "cpu":
        if chosen == torch.float16:
            warnings.warn("dtype fp16 on a CPU is slow (few CPUs compute in fp16); bf16 or fp32 "
                          "suits a CPU, and dtype auto picks between them", stacklevel=2)
        elif chosen == torch.bfloat16 and not native_bf16_cpu():
            warnings.warn("dtype bf16 on this CPU is emulated (no AVX512-BF16/AMX) and far "
                          "slower than fp32; dtype auto picks fp32 here", stacklevel=2)
    return chosen


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16" (the PNG metadata's spelling)."""
    return str(dtype).removeprefix("torch.")


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, *args):
    """(fn(*args), wall-clock seconds), synchronising a GPU so its asynchronous work is counted."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - start
