"""Real SGLang server on CPU at TP=2, g=2, Hadamard: decode with the paper's local RMSNorm and
least-squares logit scales (mu 'lsq' from a calibration file) matches the fp32 pd-sep reference.

The server prefills in 3-token chunks (``--chunked-prefill-size 3``): every chunk after the first is an
exact extend over a cached prefix on the latent-split pool, so the same comparison also checks chunked
prefill (prompts of 8 and 9 tokens: at least 5 prefill batches)."""

import pytest
import torch

from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.reference import normalize_latent
from sglang_tpla.reference_model import AttentionMode
from sglang_tpla.serving import ServerProcess
from sglang_tpla.transforms import make_rotation

from serving_utils import BUDGET, FP32, reference, served_vs_reference, tiny_model

pytestmark = pytest.mark.slow


def _calibration(ref, path):
    """A format-2 file for this model: reference moments, reference keys u, random queries."""
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(4, 250, (40,), generator=gen).tolist() for _ in range(3)]
    keys = [[] for _ in range(ref.num_layers)]
    for s in seqs:
        cache = ref.new_cache()
        ref.forward(s, 0, cache, AttentionMode("mla"), decode=False)
        for i, layer in enumerate(cache):
            keys[i].append(normalize_latent(layer["c"], ref.eps, "exact"))
    keys = [torch.cat(k) for k in keys]
    queries = [torch.randn(k.shape, generator=gen) * torch.linspace(2.0, 0.2, k.shape[1]) for k in keys]
    rows = [ref.sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:512] for i in range(ref.num_layers)]
    ident = ModelIdentity("DeepseekV3ForCausalLM", 512, ref.num_layers, weights_hash(rows))
    cal = Calibration.from_moments(ident, ref.latent_second_moments(seqs), 120, lsq_pairs=(queries, keys))
    cal.save(path)
    return cal, queries, keys


def _lsq_mu_direct(queries, keys, rotation, g, eps):
    """mu_j computed here, not by the calibration code: per latent group a one-column least-squares
    solve (torch.linalg.lstsq) of the group's partial logit, with its key slice locally
    RMS-normalised in the rotated basis, against the exact logit computed in the original basis."""
    mus = []
    for q, k in zip(queries, keys):
        q, k = q.double(), k.double()
        exact = torch.einsum("nr,nr->n", q, k)
        qr, kr = q @ rotation.double(), k @ rotation.double()
        w = q.shape[1] // g
        row = []
        for j in range(g):
            ks = kr[:, j * w:(j + 1) * w]
            ks = ks / torch.sqrt((ks * ks).mean(-1, keepdim=True) + eps)  # sqrt(g * p_j) = 1 for p_j = 1/g
            part = (qr[:, j * w:(j + 1) * w] * ks).sum(-1, keepdim=True)
            row.append(float(torch.linalg.lstsq(part, exact.unsqueeze(-1)).solution))
        mus.append(row)
    return mus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = tiny_model(tmp_path_factory, seed=2)
    logs = tmp_path_factory.mktemp("logs")
    cal_path = logs / "calib.pt"
    cal, queries, keys = _calibration(reference(model_dir), cal_path)
    opts = f'{{"tpla": {{"g": 2, "transform": "hadamard", "norm": "local", "mu": "lsq", "calibration": "{cal_path}"}}}}'
    server = ServerProcess(
        model_dir, tp=2, env=BUDGET, log_path=logs / "tpla-local.log", name="tpla-tp2-local", startup_timeout=1800,
        args=FP32 + ["--decode-attention-backend", "tpla", "--json-model-override-args", opts, "--chunked-prefill-size", "3"],
    )
    with server:
        yield model_dir, cal, queries, keys, server


def test_local_norm_and_lsq_mu_match_pd_sep_reference(setup):
    model_dir, cal, queries, keys, server = setup
    ref = reference(model_dir, "hadamard", seed=0)
    had = make_rotation("hadamard", 512, seed=0)
    mu = _lsq_mu_direct(queries, keys, had, 2, ref.eps)  # what the server must have derived from the file
    print("lsq mu per layer (g=2, hadamard, local norm):", mu)
    file_mu = cal.logit_scales("lsq", 2, rotations=[had] * ref.num_layers, norm="local", eps=ref.eps)
    assert all(abs(a - b) < 1e-9 * max(1.0, abs(a)) for ra, rb in zip(mu, file_mu) for a, b in zip(ra, rb)), (mu, file_mu)
    assert any(abs(m - 1.0) > 1e-3 for row in mu for m in row)  # a real scale, not the identity
    rows = served_vs_reference(server, ref, AttentionMode("pd_sep", g=2, norm="local", mu=mu))
    chunks = server.log_text().count("Prefill batch")
    print("local norm + lsq, 3-token prefill chunks (cached, tokens equal, max|dlogprob|):", rows, "prefill batches:", chunks)
    assert chunks >= 5  # two prompts of 8 and 9 tokens in 3-token chunks
    assert rows[1][0] >= 6, "second prompt should reuse the cached prefix"
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows
    # and it is not the exact-norm, mu=1 decode
    base = served_vs_reference(server, ref, AttentionMode("pd_sep", g=2))
    print("vs exact-norm mu=1 reference:", base)
    assert max(d for _, _, d in base) > 1e-3
