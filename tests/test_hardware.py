"""precision and channels_last 'auto': the choice on CPUs with and without native bf16, and on a (fake) CUDA device."""
import pytest
import torch

from busi import hardware
from busi.config import make_config
from busi.errors import BusiError


def _cpu(monkeypatch, onednn: bool, instructions: list[str]):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: onednn)
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: instructions)


def _resolve(overrides):
    return hardware.resolve(make_config(overrides))


def test_cpu_without_bf16_trains_in_fp32(monkeypatch):
    _cpu(monkeypatch, onednn=False, instructions=[])
    cfg, said = _resolve({})
    assert cfg.precision == "32-true" and cfg.channels_last is True
    assert "precision 32-true" in said[0] and "no native bf16" in said[0]


def test_avx512_without_bf16_instructions_is_not_native(monkeypatch):
    """oneDNN converts bf16 on AVX-512 CPUs without AVX512-BF16: no faster than fp32, so auto keeps fp32."""
    _cpu(monkeypatch, onednn=True, instructions=[])
    assert _resolve({})[0].precision == "32-true"


def test_cpu_with_native_bf16_trains_in_bf16(monkeypatch):
    _cpu(monkeypatch, onednn=True, instructions=["avx512_bf16"])
    cfg, said = _resolve({"accelerator": "cpu"})
    assert cfg.precision == "bf16-mixed" and "natively" in said[0]


def test_bf16_asked_for_without_it_warns_and_runs(monkeypatch):
    _cpu(monkeypatch, onednn=False, instructions=[])
    cfg, said = _resolve({"precision": "bf16-mixed", "channels_last": False})
    assert cfg.precision == "bf16-mixed" and cfg.channels_last is False  # the user's choice stands
    assert len(said) == 1 and said[0].startswith("busi: warning:") and "several times slower" in said[0]


def test_explicit_choices_are_kept_silently(monkeypatch):
    _cpu(monkeypatch, onednn=True, instructions=["amx"])
    cfg, said = _resolve({"precision": "32-true", "channels_last": True})
    assert (cfg.precision, cfg.channels_last, said) == ("32-true", True, [])


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "32-true")])
def test_fake_cuda_device(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)  # the CPU beside it must not matter
    for accelerator in ("auto", "gpu"):
        cfg, said = _resolve({"accelerator": accelerator})
        assert cfg.precision == expected and cfg.channels_last is True
        assert "Fake GPU" in said[0]


def test_bad_precision_lists_the_valid_ones():
    with pytest.raises(BusiError, match="'precision' must be one of auto, 32-true, bf16-mixed"):
        make_config({"precision": "8-bogus"})


def test_channels_last_takes_true_false_or_auto():
    assert make_config({"channels_last": "auto"}).channels_last == "auto"
    with pytest.raises(BusiError, match="true, false or auto"):
        make_config({"channels_last": "sometimes"})



def test_a_torchvision_of_another_build_is_one_line_with_the_fix(monkeypatch):
    import builtins
    import sys
    from busi.compat import check_torch
    from busi.errors import BusiError
    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(BusiError) as e:
        check_torch()
    message = str(e.value)
    assert "do not work together (operator torchvision::nms does not exist)" in message
    assert "pip install --force-reinstall --no-deps \"torchvision==0." in message and "\n" not in message
