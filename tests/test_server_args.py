"""TPLA's refusals at SGLang's argument resolution (``patches/server_args.py``), without a server:
the pure check (``config.check_server_compat``) and the hook's reading of a real ``ServerArgs``
record (raw input, and SGLang's resolved values for the per-worker second line)."""

import json
import os

import pytest

from sglang_tpla.config import TPLAConfig, TPLAConfigError, check_server_compat

HADAMARD0 = {"kind": "hadamard", "seed": 0, "fingerprint": TPLAConfig(transform="hadamard", seed=0).fingerprint()}


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(enable_dp_attention=True), "DP attention (--enable-dp-attention"),
        (dict(attn_dp_size=2), "DP attention (--attn-dp-size 2"),
        (dict(dcp_size=2), "decode context parallelism (--dcp-size 2)"),
        (dict(pp_size=2), "pipeline parallelism (--pp-size 2)"),
        (dict(speculative_algorithm="NGRAM"), "speculative decoding (--speculative-algorithm NGRAM)"),
        (dict(enable_mixed_chunk=True), "mixed chunks (--enable-mixed-chunk"),
        (dict(disaggregation_mode="decode", transfer_backend="nixl"), "--disaggregation-transfer-backend mooncake|mooncake_tcp (got nixl)"),
        (dict(disaggregation_mode="decode", transfer_backend="mori"), "(got mori)"),
        (dict(environ={"SGLANG_TPLA_G": "x"}), "g and seed must be integers"),
        (dict(tpla_json={"g": 2, "frobnicate": 1}), "unknown option"),
        (dict(converted=HADAMARD0, tpla_json={"transform": "none"}), "converted with transform 'hadamard:seed=0'"),
        (dict(converted=HADAMARD0, tpla_json={"seed": 1}), "configured for 'hadamard:seed=1'"),
    ],
)
def test_refused_with_tpla_on(kwargs, needle):
    with pytest.raises(TPLAConfigError) as e:
        check_server_compat(**kwargs)
    assert needle in str(e.value)
    assert "TPLA" in str(e.value)


def test_allowed_with_tpla_on():
    assert check_server_compat() == []
    assert check_server_compat(tpla_json={"g": 2}, environ={"SGLANG_TPLA_TRANSFORM": "none", "SGLANG_TPLA_IMPL": "torch"}) == []
    for backend in ("mooncake", "mooncake_tcp", "fake"):
        check_server_compat(disaggregation_mode="decode", transfer_backend=backend)
    check_server_compat(disaggregation_mode="prefill", transfer_backend="nixl")  # the decode node decides
    check_server_compat(converted=HADAMARD0, tpla_json={"g": 2})  # the transform it was converted with
    # pca is identified by its calibration file's content: a missing file is refused at load, with the model
    check_server_compat(converted=HADAMARD0, tpla_json={"transform": "pca", "calibration": "/nonexistent.pt"})


def test_features_are_fine_with_tpla_off():
    off = dict(tpla_on=False)
    assert check_server_compat(2, 2, 2, "EAGLE", True, enable_dp_attention=True, disaggregation_mode="decode",
                               transfer_backend="nixl", converted=HADAMARD0, **off) == []


@pytest.mark.parametrize("var", ["SGLANG_TPLA_G", "SGLANG_TPLA_TRANSFORM", "SGLANG_TPLA_SEED", "SGLANG_TPLA_CALIBRATION",
                                 "SGLANG_TPLA_MU", "SGLANG_TPLA_NORM", "SGLANG_TPLA_PREFILL"])
def test_option_env_refused_with_tpla_off(var):
    with pytest.raises(TPLAConfigError, match=f"TPLA options were given \\({var}=v\\) but TPLA is off"):
        check_server_compat(tpla_on=False, environ={var: "v"})
    # a PD prefill node folds the options of its "tpla" JSON (the environment merges under it), not env alone
    with pytest.raises(TPLAConfigError, match="TPLA is off"):
        check_server_compat(tpla_on=False, disaggregation_mode="prefill", environ={var: "v"})


def test_options_on_a_prefill_node_and_json_with_tpla_off():
    assert check_server_compat(tpla_on=False, disaggregation_mode="prefill", tpla_json={"seed": 3},
                               environ={"SGLANG_TPLA_TRANSFORM": "hadamard"}) == []
    with pytest.raises(TPLAConfigError, match='"tpla" in --json-model-override-args\\) but TPLA is off'):
        check_server_compat(tpla_on=False, tpla_json={"g": 2})
    with pytest.raises(TPLAConfigError, match="configured for 'identity'"):  # prefill node: same basis check
        check_server_compat(tpla_on=False, disaggregation_mode="prefill", tpla_json={"transform": "none"},
                            converted=HADAMARD0)


def test_tooling_env_silent_and_harmless_env_warned():
    tooling = {"SGLANG_TPLA_CPU_MEM_GB": "1", "SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS": "1", "SGLANG_TPLA_CPU_TRACE_ATTN": "1",
               "SGLANG_TPLA_CALIBRATE_DIR": "/tmp/x", "SGLANG_TPLA_CALIBRATE_PAIRS": "64", "SGLANG_TPLA_PD_DIGEST_DIR": "/tmp/d",
               "SGLANG_TPLA_PD_STAGING_MB": "8", "SGLANG_TPLA_ENV_ROOT": "/tmp/e"}
    assert check_server_compat(tpla_on=False, environ=tooling) == []
    assert check_server_compat(environ=tooling) == []
    assert check_server_compat(tpla_on=False, environ={"SGLANG_TPLA_IMPL": "torch"}) == [
        "SGLANG_TPLA_IMPL=torch does nothing: TPLA is off"]
    warned = check_server_compat(environ={"SGLANG_TPLA_TRANSFROM": "pca"})  # a typo would be ignored silently
    assert len(warned) == 1 and "SGLANG_TPLA_TRANSFROM is not a TPLA setting" in warned[0]


def test_every_sglang_tpla_variable_in_the_code_is_classified():
    """A new SGLANG_TPLA_* variable must be added to config.py's lists (else it is warned about as unknown)."""
    import re
    from pathlib import Path

    from sglang_tpla import config

    root = Path(__file__).resolve().parents[1]
    used = set()
    for sub in ("sglang_tpla", "patches", "kernels"):
        for p in (root / sub).rglob("*.py"):
            used |= set(re.findall(r"SGLANG_TPLA_[A-Z0-9_]*[A-Z0-9]", p.read_text()))
    known = set(config._ENV.values()) | set(config.TOOLING_ENV) | set(config.TPLA_ONLY_ENV)
    assert used <= known, sorted(used - known)


# --------------------------------------------------------------------------- the hook on a real ServerArgs


def _args(*argv):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", "dummy", *argv])


@pytest.fixture
def cli(monkeypatch):
    """SGLang's CLI accepting ``tpla`` (what patches/attention_backend.py's install() adds, in place), and
    no SGLANG_TPLA_* variable from the caller's environment."""
    from sglang.srt.arg_groups import choices

    for k in [k for k in os.environ if k.startswith("SGLANG_TPLA_")]:
        monkeypatch.delenv(k)
    added = "tpla" not in choices.ATTENTION_BACKEND_CHOICES
    if added:
        choices.ATTENTION_BACKEND_CHOICES.append("tpla")
    yield
    if added:
        choices.ATTENTION_BACKEND_CHOICES.remove("tpla")


def test_hook_reads_the_raw_record(cli, monkeypatch, tmp_path):
    from sglang_tpla.patches import server_args as hook

    tpla = ["--decode-attention-backend", "tpla"]
    hook.check(_args(*tpla, "--tp", "2"))
    for argv, needle in (
        (["--tp", "2", "--dp-size", "2", "--enable-dp-attention"], "DP attention (--enable-dp-attention"),
        (["--tp", "2", "--attn-dp-size", "2"], "DP attention (--attn-dp-size 2"),
        (["--dcp-size", "2"], "--dcp-size 2"),
        (["--pp-size", "2"], "--pp-size 2"),
        (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm EAGLE"),
        (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
        (["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "nixl"], "(got nixl)"),
        (["--json-model-override-args", '{"tpla": {"g": "two"}}'], "g and seed must be integers"),
    ):
        with pytest.raises(TPLAConfigError, match="TPLA") as e:
            hook.check(_args(*tpla, *argv))
        assert needle in str(e.value), (argv, str(e.value))
    hook.check(_args("--tp", "2", "--dp-size", "2", "--enable-dp-attention"))  # TPLA off: SGLang's business
    with pytest.raises(TPLAConfigError, match="TPLA is off"):
        hook.check(_args("--json-model-override-args", '{"tpla": {"g": 2}}'))
    monkeypatch.setenv("SGLANG_TPLA_G", "2")
    with pytest.raises(TPLAConfigError, match="SGLANG_TPLA_G=2"):
        hook.check(_args())
    monkeypatch.delenv("SGLANG_TPLA_G")
    # a converted checkpoint: its config.json carries the record
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"kv_lora_rank": 512, "tpla_transform": HADAMARD0}))
    from sglang.srt.server_args import prepare_server_args

    conv = ["--model-path", str(ckpt), *tpla]
    hook.check(prepare_server_args(conv))
    with pytest.raises(TPLAConfigError, match="converted with transform 'hadamard:seed=0'"):
        hook.check(prepare_server_args([*conv, "--json-model-override-args", '{"tpla": {"transform": "none"}}']))


def test_hook_reads_resolved_values(cli):
    """The per-worker second line reads what SGLang resolved: ``--dp-size 2 --enable-dp-attention``
    becomes ``attn_dp_size 2`` (the raw ``attn_dp_size`` stays 1)."""
    from sglang_tpla.patches import server_args as hook

    args = _args("--tp", "2", "--dp-size", "2", "--enable-dp-attention", "--decode-attention-backend", "tpla")
    args.resolve_once()  # no plugins in this process: SGLang's own resolution only
    assert args.attn_dp_size == 1  # the raw record: what runtime.py read before
    with pytest.raises(TPLAConfigError, match="DP attention \\(--attn-dp-size 2"):
        hook.check(args, resolved=True)


def test_hook_runs_once_before_resolution(monkeypatch):
    """The check runs before SGLang's resolution, and not again on a worker's resolved copy."""
    from types import SimpleNamespace

    from sglang_tpla.patches import server_args as hook

    order = []
    monkeypatch.setattr(hook, "check", lambda args, **kw: order.append("tpla"))
    rec = SimpleNamespace(_resolution_finished=False)
    hook._resolve_once(lambda self: order.append("sglang"), rec)
    rec._resolution_finished = True
    hook._resolve_once(lambda self: order.append("sglang"), rec)
    assert order == ["tpla", "sglang", "sglang"]
