"""PD disaggregation on CPU, for real: prefill TP=2 (exact MLA) -> decode TP=2 (TPLA, g=2) over mooncake,
with 64-token pages on both nodes (as GPU deployments use).

Each decode rank pulls from its own prefill rank.  The served tokens and logprobs are
checked against the fp32 reference in pd-sep mode (exact prefill, TPLA decode), the oracle
the single-server TPLA path is itself tested against, and the received rows against the
digests of what each prefill rank sent.
"""

from __future__ import annotations

import pytest
from pd_utils import assert_same, check_digests, deploy, served
from serving_utils import NEW_TOKENS, PROMPTS, reference, tiny_model, tpla_mode


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=3)


def test_prefill_tp2_to_decode_tp2(model, tmp_path_factory):
    ref = reference(model, "hadamard")
    want = [ref.generate(p, NEW_TOKENS, tpla_mode("pd_sep", 2, ref)) for p in PROMPTS]
    with deploy(model, tmp_path_factory, 2, "pd-tp2", page_size=64) as dep:
        assert_same(served(dep), want)
        check_digests(dep, len(PROMPTS))
