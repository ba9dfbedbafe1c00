"""PD disaggregation on CPU, for real: prefill TP=2 (exact MLA) -> decode TP=2 (TPLA, g=2) over mooncake,
with 64-token pages on both nodes (as GPU deployments use), on a block-FP8 checkpoint converted offline
(``sglang_tpla.convert``, Hadamard) and served by both nodes.

Each decode rank pulls from its own prefill rank.  The served tokens and logprobs are checked against
the fp32 reference in pd-sep mode on the dequantized FP8 weights with the Hadamard transform folded at
load (what a single TPLA server serves from the unconverted checkpoint, ``tests/test_serving_fp8.py``):
the converted checkpoint is not folded a second time on either node.  The received rows are checked
against the digests of what each prefill rank sent.
"""

from __future__ import annotations

import pytest
from pd_utils import assert_same, check_digests, deploy, served
from serving_utils import NEW_TOKENS, PROMPTS, reference, tpla_mode

from sglang_tpla.convert import convert
from sglang_tpla.tiny_model import build_tiny_fp8_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return build_tiny_fp8_model_dir(tmp_path_factory.mktemp("fp8") / "model", seed=3, hidden_size=512)


@pytest.fixture(scope="module")
def converted(fp8_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "model"
    convert(fp8_dir, dst, "hadamard", seed=0, dequant_dtype="float32")
    return dst


def test_converted_fp8_prefill_tp2_to_decode_tp2(fp8_dir, converted, tmp_path_factory):
    ref = reference(fp8_dir, "hadamard")  # dequantized FP8 weights, Hadamard folded in fp32
    want = [ref.generate(p, NEW_TOKENS, tpla_mode("pd_sep", 2, ref)) for p in PROMPTS]
    with deploy(converted, tmp_path_factory, 2, "pd-tp2", page_size=64) as dep:
        assert "checkpoint already converted" in dep.decode.log_text()
        assert_same(served(dep), want)
        check_digests(dep, len(PROMPTS))
