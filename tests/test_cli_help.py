"""The convenience launcher's interface: --help shows the TPLA flags, unknown --tpla-* flags are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_tpla.launch_server import VALID_FLAGS, main, translate


def test_help_prints_sglang_help_and_every_tpla_flag_with_its_default():
    out = subprocess.run([sys.executable, "-m", "sglang_tpla.launch_server", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "--model-path" in text and "--decode-attention-backend" in text, "SGLang's own help is missing"
    tpla = text[text.index("TPLA (sglang_tpla):"):]  # the TPLA section comes after SGLang's flags
    for flag in VALID_FLAGS:
        assert flag in tpla, flag
    for default in ("Default: the attention TP size", "Default: hadamard", "Default: 0.", "Default: inv_p",
                    "Default: exact.", "Default: off"):
        assert default in tpla, default
    assert "is still supported, but 'sglang serve'" not in out.stderr  # SGLang's entry-point hint is not ours


@pytest.mark.parametrize("argv, near", [
    (["--model-path", "M", "--tpla-gg", "2"], "--tpla-g"),
    (["--model-path", "M", "--enable-tpla", "--tpla-transfrom=pca"], "--tpla-transform"),
    (["--model-path", "M", "--tpla_norm", "local"], "--tpla-norm"),
])
def test_unknown_tpla_flag_is_an_error_naming_the_valid_ones(argv, near, capsys):
    with pytest.raises(SystemExit) as e:
        translate(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"did you mean {near}?" in err
    assert all(f in err for f in VALID_FLAGS), err


def test_tpla_flags_without_enable_name_the_fix(capsys):
    with pytest.raises(SystemExit) as e:
        translate(["--model-path", "M", "--tpla-g", "2", "--tpla-mu=one"])
    assert e.value.code == 2
    assert "--tpla-g, --tpla-mu need --enable-tpla" in capsys.readouterr().err


def test_sglang_flags_pass_through_unchanged():
    out = translate(["--model-path", "M", "--enable-tpla", "--tpla-g", "2", "--tp", "2"])
    assert out[:4] == ["--model-path", "M", "--tp", "2"]
    assert ["--decode-attention-backend", "tpla"] == out[4:6]
    assert '"g": 2' in out[-1]


def test_unknown_flag_is_refused_before_sglang_is_started(capsys, monkeypatch):
    monkeypatch.setattr("os.execv", lambda *a: pytest.fail("must not exec sglang"))
    with pytest.raises(SystemExit):
        main(["--model-path", "M", "--enable-tpla", "--tpla-groups", "2"])
    assert "unknown TPLA flag --tpla-groups" in capsys.readouterr().err
