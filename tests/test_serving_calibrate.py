"""The calibration CLI end to end: a real SGLang server (TP=1, fp32) captures the latent second
moments of exact MLA prefill; they match the fp32 reference model on the same token windows."""

import pytest
import torch

from sglang_tpla import calibrate
from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.reference import normalize_latent
from sglang_tpla.reference_model import AttentionMode

from serving_utils import BUDGET, FP32, reference, tiny_model

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
            "--seq-len", "64", "--batch", "3", "--lsq-pairs", "64", "--out", str(out), "--", *FP32]
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

    # a rerun overwrites the file atomically (same args, new content checksum-valid)
    before = out.stat().st_mtime_ns
    assert calibrate.main(args) == 0
    again = Calibration.load(out, expect=ident)
    assert out.stat().st_mtime_ns != before
    torch.testing.assert_close(again.second_moments[0], cal.second_moments[0], rtol=1e-9, atol=1e-12)
    assert not list(tmp_path.glob("*.tmp"))
