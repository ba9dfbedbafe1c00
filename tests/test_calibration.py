import pytest
import torch

from sglang_tpla.calibration import Calibration, CalibrationError, ModelIdentity, weights_hash
from sglang_tpla.reference_model import ReferenceDeepseek
from sglang_tpla.tiny_model import random_state_dict, tiny_config


def _calib(cfg, sd):
    rows = [sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:512] for i in range(cfg["num_hidden_layers"])]
    ident = ModelIdentity("DeepseekV3ForCausalLM", 512, cfg["num_hidden_layers"], weights_hash(rows))
    moments = ReferenceDeepseek(cfg, sd).latent_second_moments([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13]])
    return Calibration.from_moments(ident, moments, num_tokens=11), ident


def test_roundtrip_checksum_and_identity(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=4)
    cal, ident = _calib(cfg, sd)
    path = cal.save(tmp_path / "t.pt")
    back = Calibration.load(path, expect=ident)
    assert back.num_tokens == 11 and torch.equal(back.rotations[1], cal.rotations[1])
    p = back.energy_fractions(0, 2)
    assert p.sum().item() == pytest.approx(1.0) and p[0] > p[1]
    # hash is dtype-stable (bf16 vs fp32 copies of the same checkpoint)
    rows = [sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:512].bfloat16() for i in range(2)]
    assert weights_hash(rows) == ident.weights_hash

    other = ModelIdentity(ident.architecture, 512, 2, "0" * 64)
    with pytest.raises(CalibrationError, match="differs in weights_hash"):
        Calibration.load(path, expect=other)
    with pytest.raises(CalibrationError, match="differs in num_layers"):
        Calibration.load(path, expect=ModelIdentity(ident.architecture, 512, 3, ident.weights_hash))

    blob = torch.load(path, weights_only=True)
    blob["payload"]["num_tokens"] = 12
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(CalibrationError, match="checksum"):
        Calibration.load(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_text("not a file")
    with pytest.raises(CalibrationError, match="not a TPLA calibration file"):
        Calibration.load(tmp_path / "junk.pt")
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(tmp_path / "missing.pt")
