"""Decode-side refusal of incompatible prefill nodes (patches/disaggregation.py), without servers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_tpla.config import TPLAConfig
from sglang_tpla.layout import TPLALayout
from sglang_tpla.patches import disaggregation as pd
from sglang_tpla.patches.runtime import NodeBasis, TPLARuntime

ADDR = "10.0.0.1:8998"


class _Resp:
    def __init__(self, status, data=None):
        self.status_code, self._data = status, data

    def json(self):
        return self._data


def _info(**kw):
    base = dict(pp_size=1, attn_cp_size=1, enable_kv_cache_sharding=False, dp_size=1, attn_tp_size=2)
    return SimpleNamespace(**{**base, **kw})


def _ranks(basis="hadamard:seed=0", r=512, n=2):
    return {f"dp0-cp0-tp{i}-pp0": {"basis": basis, "kv_lora_rank": r, "source": "folded at load"} for i in range(n)}


@pytest.fixture
def decode_node(monkeypatch):
    rt = TPLARuntime(TPLAConfig(g=2, transform="hadamard"), TPLALayout(2, 2, 16), 0)
    monkeypatch.setattr(pd, "current", lambda: rt)
    monkeypatch.setattr(pd, "node_basis", lambda: NodeBasis("hadamard:seed=0", 512, 64, "folded at load"))

    def run(response, info=None):
        import requests

        monkeypatch.setattr(requests, "get", lambda url, timeout: response)
        return pd._peer_problem(SimpleNamespace(prefill_info_table={ADDR: info or _info()}), ADDR)

    return run


def test_matching_prefill_node_is_accepted(decode_node):
    assert decode_node(_Resp(200, {"ranks": _ranks()})) is None


def test_prefill_without_plugin_is_refused(decode_node):
    assert "does not run the sglang-tpla plugin" in decode_node(_Resp(404))


def test_other_basis_is_refused_naming_both_sides(decode_node):
    msg = decode_node(_Resp(200, {"ranks": _ranks("identity")}))
    assert "latent basis mismatch" in msg and "'identity'" in msg and "'hadamard:seed=0'" in msg


def test_other_model_and_split_ranks_are_refused(decode_node):
    assert "kv_lora_rank=256" in decode_node(_Resp(200, {"ranks": _ranks(r=256)}))
    mixed = {**_ranks(), "dp0-cp0-tp1-pp0": {"basis": "identity", "kv_lora_rank": 512}}
    assert "no single latent basis" in decode_node(_Resp(200, {"ranks": mixed}))


@pytest.mark.parametrize("kw", [{"pp_size": 2}, {"attn_cp_size": 2}, {"enable_kv_cache_sharding": True}])
def test_unsupported_prefill_parallelism_is_refused(decode_node, kw):
    assert "pipeline parallelism" in decode_node(_Resp(200, {"ranks": _ranks()}), _info(**kw))


def test_untransformed_decode_node_matches_an_unconverted_prefill_node():
    # the decode node with transform none records TPLAConfig.fingerprint(); a prefill node serving
    # the checkpoint as is records "identity" (patches/weights.py): they must be the same basis
    assert TPLAConfig(g=2, transform="none").fingerprint() == "identity"


def test_pd_launch_folds_on_prefill_only_for_a_transform(tmp_path):
    from sglang_tpla.pd_launch import PDDeployment, PDSpec

    def prefill_args(transform):
        dep = PDDeployment(PDSpec(model_path="m", transform=transform, log_dir=str(tmp_path))).build()
        return dep.prefills[0].args, dep.decode.args

    p_none, d_none = prefill_args("none")
    assert "--json-model-override-args" not in p_none
    assert '"transform": "none"' in d_none[d_none.index("--json-model-override-args") + 1]
    p_had, _ = prefill_args("hadamard")
    assert '"transform": "hadamard"' in p_had[p_had.index("--json-model-override-args") + 1]
