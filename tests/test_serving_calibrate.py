"""The calibration CLI end to end: a real SGLang server (TP=1, fp32) captures the latent second
moments, key means and absorbed-query moments of exact MLA prefill; they match the fp32
reference model on the same token windows.  The file's fitted rotation (``--fit-g 2``) then
serves as transform ``fit`` at TP=2 and matches the fp32 reference folded with it."""

import pytest
import torch

from sglang_tpla import calibrate
from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.reference import normalize_latent
from sglang_tpla.reference_model import AttentionMode, _rms
from sglang_tpla.serving import ServerProcess
from sglang_tpla.transforms import fold_state_dict

from serving_utils import BUDGET, FP32, reference, served_vs_reference, tiny_model

pytestmark = pytest.mark.slow


def test_calibrate_cli_matches_reference_moments(tmp_path_factory, tmp_path, monkeypatch):
    model_dir = tiny_model(tmp_path_factory, seed=5)
    for k, v in BUDGET.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SGLANG_TPLA_G", "2")  # must not reach the calibration server (plain MLA)
    gen = torch.Generator().manual_seed(0)
    words = [" ".join(f"w{int(i)}" for i in torch.randint(4, 250, (int(n),), generator=gen)) for n in (90, 120, 150)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "{w}"}}\n' for w in words))
    out = tmp_path / "calib.pt"
    args = ["--model-path", str(model_dir), "--tp", "1", "--data", str(data), "--num-tokens", "300",
            "--seq-len", "64", "--batch", "3", "--lsq-pairs", "64", "--fit-g", "2", "--fit-steps", "5", "--out", str(out),
            "--", *FP32]
    assert calibrate.main(args) == 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows = calibrate.make_windows(calibrate.token_stream(calibrate.read_texts(data), tok), 300, 64)
    ref = reference(model_dir)
    want = ref.latent_second_moments(windows)
    rows = [ref.sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:512] for i in range(ref.num_layers)]
    ident = ModelIdentity("DeepseekV3ForCausalLM", 512, ref.num_layers, weights_hash(rows))
    cal = Calibration.load(out, expect=ident)  # the identity the server recorded is what weights.py checks
    assert cal.num_tokens == 300
    for i in range(ref.num_layers):
        err = (cal.second_moments[i] - want[i]).abs().max().item()
        rel = err / want[i].abs().max().item()
        print(f"layer {i}: max |served - reference| second moment {err:.3e} (relative {rel:.3e})")
        assert rel < 1e-5
    # every sampled key is a token's u of the calibration windows; the fit is finite
    us = []
    for w in windows:
        cache = ref.new_cache()
        ref.forward(w, 0, cache, AttentionMode("mla"), decode=False)
        us.append([normalize_latent(layer["c"], ref.eps, "exact") for layer in cache])
    for i in range(ref.num_layers):
        allu = torch.cat([u[i] for u in us])
        keys = cal.lsq_keys[i]
        assert keys.shape == (64, 512)
        d = torch.cdist(keys.double(), allu.double()).min(dim=1).values.max().item()
        print(f"layer {i}: lsq pairs {keys.shape[0]}, max distance of a key to a reference u row {d:.2e}, "
              f"lsq mu (g=2, original basis) {cal.lsq_logit_scales(i, 2, None).tolist()}")
        assert d < 1e-3
        assert torch.isfinite(cal.lsq_logit_scales(i, 4)).all()

    # key means and absorbed-query moments (all heads at TP=1) for the fit transform
    for i in range(ref.num_layers):
        allu = torch.cat([u[i] for u in us]).double()
        queries = torch.cat([_absorbed_queries(ref, w, i) for w in windows])
        for got, want, what in ((cal.key_means[i], allu.mean(0), "key mean"),
                                (cal.query_moments[i], queries.T @ queries / queries.shape[0], "query moment")):
            rel = (got - want).abs().max().item() / want.abs().max().item()
            print(f"layer {i}: {what} relative error {rel:.2e}")
            assert rel < 1e-5
    assert sorted(cal.fitted) == [2]
    fit = cal.rotations_for("fit", 2)
    torch.testing.assert_close(fit[0].T @ fit[0], torch.eye(512, dtype=torch.float64), atol=1e-10, rtol=0)

    # a rerun overwrites the file atomically (same args, new content checksum-valid)
    before = out.stat().st_mtime_ns
    assert calibrate.main(args) == 0
    again = Calibration.load(out, expect=ident)
    assert out.stat().st_mtime_ns != before
    torch.testing.assert_close(again.second_moments[0], cal.second_moments[0], rtol=1e-9, atol=1e-12)
    assert not list(tmp_path.glob("*.tmp"))


def _absorbed_queries(ref, ids, layer):
    """``a = q_nope W_UK * gamma`` of every token and head of ``layer`` (what the capture records)."""
    captured = []
    orig = ref._attention

    def hook(i, x, *args):
        if i == layer:
            p = f"model.layers.{i}.self_attn."
            q = _rms(x @ ref.sd[p + "q_a_proj.weight"].T, ref.sd[p + "q_a_layernorm.weight"], ref.eps) @ ref.sd[p + "q_b_proj.weight"].T
            q_nope = q.view(x.shape[0], ref.heads, -1)[..., : ref.nope]
            a = torch.einsum("thn,hnr->thr", q_nope, ref.attn_w[i].w_kc) * ref.sd[p + "kv_a_layernorm.weight"]
            captured.append(a.reshape(-1, ref.r).double())
        return orig(i, x, *args)

    ref._attention = hook
    try:
        ref.forward(ids, 0, ref.new_cache(), AttentionMode("mla"), decode=False)
    finally:
        ref._attention = orig
    return captured[0]


def test_fit_transform_served_matches_reference(tmp_path_factory):
    """transform 'fit' (g=2, mu inv_p) from a calibration file, TP=2, vs the fp32 pd-sep reference."""
    from sglang_tpla.calibration import Calibration
    from sglang_tpla.tiny_model import load_model
    from sglang_tpla.reference_model import ReferenceDeepseek
    from sglang_tpla.rotation_fit import fit_calibration

    model_dir = tiny_model(tmp_path_factory, seed=5)
    ref = reference(model_dir)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, 250, (48,), generator=gen).tolist() for _ in range(3)]
    rows = [ref.sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:512] for i in range(ref.num_layers)]
    ident = ModelIdentity("DeepseekV3ForCausalLM", 512, ref.num_layers, weights_hash(rows))
    means, qm, us = [], [], []
    for i in range(ref.num_layers):
        q = torch.cat([_absorbed_queries(ref, s, i) for s in seqs])
        qm.append(q.T @ q / q.shape[0])
    for s in seqs:
        cache = ref.new_cache()
        ref.forward(s, 0, cache, AttentionMode("mla"), decode=False)
        us.append([normalize_latent(layer["c"], ref.eps, "exact").double() for layer in cache])
        means.append([u.mean(0) for u in us[-1]])
    key_means = [sum(m[i] for m in means) / len(means) for i in range(ref.num_layers)]
    cal = Calibration.from_moments(ident, ref.latent_second_moments(seqs), 144, key_means=key_means, query_moments=qm)
    fit_calibration(cal, [2], steps=5, log=print)
    logs = tmp_path_factory.mktemp("fit-logs")
    path = cal.save(logs / "calib.pt")
    cfg, sd = load_model(model_dir, dtype=torch.float32)
    fitted = ReferenceDeepseek(cfg, fold_state_dict(sd, dict(enumerate(cal.rotations_for("fit", 2)))))
    mu = []  # 1/p_j with p_j measured here on the keys themselves (not from the file's moments)
    for i in range(ref.num_layers):
        rotated = torch.cat([u[i] for u in us]) @ cal.rotations_for("fit", 2)[i].double()
        energy = rotated.pow(2).sum(0)
        mu.append([float(energy.sum() / energy[:256].sum()), float(energy.sum() / energy[256:].sum())])
    file_mu = [[1.0 / float(p) for p in cal.shard_energy_fractions(i, 2, "fit")] for i in range(ref.num_layers)]
    assert torch.allclose(torch.tensor(mu), torch.tensor(file_mu), rtol=1e-9), (mu, file_mu)
    opts = f'{{"tpla": {{"g": 2, "transform": "fit", "mu": "inv_p", "calibration": "{path}"}}}}'
    server = ServerProcess(
        model_dir, tp=2, env=BUDGET, log_path=logs / "tpla-fit.log", name="tpla-tp2-fit", startup_timeout=1800,
        args=FP32 + ["--decode-attention-backend", "tpla", "--json-model-override-args", opts],
    )
    with server:
        got = served_vs_reference(server, fitted, AttentionMode("pd_sep", g=2, mu=mu))
    print("fit g=2 mu inv_p (cached, tokens equal, max|dlogprob|):", got, "mu", mu)
    assert all(eq and d < 1e-4 for _, eq, d in got)
