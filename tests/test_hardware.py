"""Device and precision choices (model/hardware.py): auto precision follows the hardware, bad
devices are one line naming --device, slow explicit choices warn."""
import pytest
import torch

from model import hardware
from model.hardware import check_device, resolve_dtype


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_a_cpu_follows_its_bf16_units(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: native)
    assert resolve_dtype("auto", "cpu") == expected and resolve_dtype(None, "cpu") == expected


def test_auto_on_gpus_is_fp16():
    assert resolve_dtype("auto", "cuda") == torch.float16 and resolve_dtype("auto", "mps") == torch.float16


def test_explicit_names_and_dtypes():
    assert resolve_dtype("fp32", "cpu") == torch.float32 and resolve_dtype(torch.float32, "cpu") == torch.float32
    with pytest.raises(ValueError, match="^dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype(torch.int8, "cpu")


def test_slow_cpu_choices_warn(monkeypatch):
    with pytest.warns(UserWarning, match="fp16 on a CPU is slow"):
        resolve_dtype("fp16", "cpu")
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        resolve_dtype("bf16", "cpu")


@pytest.mark.parametrize("name,match", [("foo", "is not a device"), ("meta", "unsupported device type"),
                                        ("cuda", "no CUDA GPU"), ("cuda:7", "^device cuda:7")])
def test_unavailable_devices_are_refused(monkeypatch, name, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=match):
        check_device(name)


def test_cpu_and_default_device():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(None).type in ("cpu", "cuda", "mps")
