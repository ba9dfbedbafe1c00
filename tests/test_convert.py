"""Offline checkpoint converter (sglang_tpla.convert): sharded bf16/fp32 and block-FP8 checkpoints, refusals."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sglang_tpla.convert as conv
from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.config import TPLAConfig
from sglang_tpla.convert import ConvertError, convert
from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import random_state_dict, save_model, save_tokenizer, tiny_config
from sglang_tpla.transforms import fold_layer, fold_state_dict, make_rotation

REPO = Path(__file__).resolve().parents[1]
IDS = [3, 17, 250, 9, 44, 101, 7, 300, 12, 5, 66, 480, 31, 2, 150, 222]
INDEX = "model.safetensors.index.json"
ATTN = ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight")


# --------------------------------------------------------------------------- helpers


def write_sharded(path: Path, cfg: dict, sd: dict, n_shards: int = 3) -> Path:
    """Round-robin over sorted names: every layer's kv_a_layernorm / kv_a_proj_with_mqa / kv_b_proj
    (consecutive names) land in different shards."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    save_tokenizer(path, cfg["vocab_size"])
    (path / "extra").mkdir()
    (path / "extra" / "notes.txt").write_text("kept as is\n")
    names = sorted(sd)
    groups = [names[i::n_shards] for i in range(n_shards)]
    wm, total = {}, 0
    for i, keys in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in keys}, str(path / fname), metadata={"format": "pt"})
        for k in keys:
            wm[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    for i in range(cfg["num_hidden_layers"]):
        assert len({wm[f"model.layers.{i}.self_attn.{s}"] for s in ATTN}) == min(3, n_shards)  # really split
    return path


def load_dir(path: Path) -> dict:
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def logits(cfg, sd):
    return ReferenceDeepseek(cfg, sd).score(IDS, len(IDS), AttentionMode("mla"))


def assert_logits_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def identity_of(cfg, sd) -> ModelIdentity:
    rows = [sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][: cfg["kv_lora_rank"]] for i in range(cfg["num_hidden_layers"])]
    return ModelIdentity(cfg["architectures"][0], cfg["kv_lora_rank"], cfg["num_hidden_layers"], weights_hash(rows))


def make_calibration(path: Path, cfg, sd) -> Path:
    moments = ReferenceDeepseek(cfg, sd).latent_second_moments([IDS[:10], IDS[4:]])
    return Calibration.from_moments(identity_of(cfg, sd), moments, num_tokens=22).save(path)


def add_mtp_layer(cfg, sd, seed=7) -> dict:
    """A DeepSeek-V3-style nextn layer at index num_hidden_layers (attention + a few MTP-only tensors)."""
    gen = torch.Generator().manual_seed(seed)
    n = cfg["num_hidden_layers"]
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith(f"model.layers.{n - 1}."):
            out[k.replace(f"layers.{n - 1}.", f"layers.{n}.")] = v + 0.01 * torch.randn(v.shape, generator=gen)
    out[f"model.layers.{n}.eh_proj.weight"] = torch.randn(cfg["hidden_size"], 2 * cfg["hidden_size"], generator=gen)
    out[f"model.layers.{n}.enorm.weight"] = torch.ones(cfg["hidden_size"])
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and avoids oversubscription stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, model):
    cfg, sd = model
    return make_calibration(tmp_path_factory.mktemp("calib") / "tiny-pca.pt", cfg, sd)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=11)
    return cfg, sd


# --------------------------------------------------------------------------- (a) exactness


def test_hadamard_sharded_with_mtp_layer(tmp_path, model):
    cfg, sd = model
    sd_mtp = add_mtp_layer(cfg, sd)
    src = write_sharded(tmp_path / "src", cfg, sd_mtp)
    dst = tmp_path / "out" / "dst"
    rec = convert(src, dst, "hadamard", seed=5)

    assert rec["fingerprint"] == TPLAConfig(transform="hadamard", seed=5).fingerprint() == "hadamard:seed=5"
    out_cfg = json.loads((dst / "config.json").read_text())
    assert out_cfg["tpla_transform"] == rec and rec["kind"] == "hadamard" and rec["seed"] == 5
    assert rec["calibration_sha256"] is None and rec["folded_layers"] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert {k: v for k, v in out_cfg.items() if k != "tpla_transform"} == cfg

    # same files, same index layout, other files copied unchanged
    src_index = json.loads((src / INDEX).read_text())
    dst_index = json.loads((dst / INDEX).read_text())
    assert dst_index["weight_map"] == src_index["weight_map"]
    assert dst_index["metadata"]["total_size"] == src_index["metadata"]["total_size"]
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "extra/notes.txt"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dst"]  # no temp folder left behind
    with safe_open(str(dst / "model-00001-of-00003.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    got = load_dir(dst)
    u = make_rotation("hadamard", 512, seed=5)
    want = fold_state_dict(sd_mtp, u)  # the MTP layer (index 2) folded with the same rotation
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert not torch.equal(got["model.layers.2.self_attn.kv_b_proj.weight"], sd_mtp["model.layers.2.self_attn.kv_b_proj.weight"])
    assert_logits_close(logits(cfg, got), logits(cfg, sd))

    # --mtp keep leaves the nextn layer bit for bit as it was
    keep = tmp_path / "keep"
    rec = convert(src, keep, "hadamard", seed=5, mtp="keep")
    assert rec["unfolded_layers"] == ["model.layers.2"]
    got = load_dir(keep)
    for k in sd_mtp:
        expect = sd_mtp[k] if k.startswith("model.layers.2.") else want[k]
        assert torch.equal(got[k], expect), k


def test_pca_sharded_matches_fold_and_hf_transformers(tmp_path, model, calib_file):
    cfg, sd = model
    src = write_sharded(tmp_path / "src", cfg, sd, n_shards=2)
    calib_path = calib_file
    dst = tmp_path / "dst"
    rec = convert(src, dst, "pca", calibration=calib_path)

    assert rec["kind"] == "pca" and rec["seed"] is None and rec["calibration_file"] == "tiny-pca.pt"
    assert rec["fingerprint"] == TPLAConfig(transform="pca", calibration=str(calib_path)).fingerprint() == "pca:sha256=" + rec["calibration_sha256"][:16]
    import hashlib

    assert rec["calibration_sha256"] == hashlib.sha256(calib_path.read_bytes()).hexdigest()

    cal = Calibration.load(calib_path)
    got = load_dir(dst)
    want = fold_state_dict(sd, dict(enumerate(cal.rotations)))
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ref = logits(cfg, sd)
    assert_logits_close(logits(cfg, got), ref)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(hf_logits, ref, rtol=1e-4, atol=1e-4)


def test_single_file_checkpoint_and_cli(tmp_path):
    """An unindexed model.safetensors through `python -m sglang_tpla.convert`, which never imports sglang."""
    cfg = tiny_config(num_hidden_layers=1, q_lora_rank=None)  # V2-Lite layout (q_proj)
    sd = random_state_dict(cfg, seed=2)
    src = save_model(tmp_path / "src", cfg, sd)
    dst = tmp_path / "dst"
    code = (
        "import runpy, sys; sys.argv = ['convert', '--src', sys.argv[1], '--dst', sys.argv[2], '--transform', 'hadamard', '--seed', '9'];"
        "\ntry:\n    runpy.run_module('sglang_tpla.convert', run_name='__main__')\n"
        "finally:\n    print('SGLANG', sorted(m for m in sys.modules if m.split('.')[0] == 'sglang'))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SGLANG []" in r.stdout
    assert "shard 1/1 model.safetensors" in r.stderr and "layer model.layers.0: folded, 3 tensors rewritten" in r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    got = load_file(str(dst / "model.safetensors"))
    want = fold_state_dict(sd, make_rotation("hadamard", 512, seed=9))
    assert all(torch.equal(got[k], want[k]) for k in want) and got.keys() == want.keys()
    assert_logits_close(logits(cfg, got), logits(cfg, sd))


# --------------------------------------------------------------------------- (b) FP8


def quantize_block_fp8(w: torch.Tensor, b: int = 128):
    o, i = w.shape
    so, si = math.ceil(o / b), math.ceil(i / b)
    pad = torch.zeros(so * b, si * b)
    pad[:o, :i] = w.float()
    blocks = pad.view(so, b, si, b)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(so * b, si * b)[:o, :i].contiguous(), scale.float()


def dequantize_in_test(q: torch.Tensor, scale: torch.Tensor, b: int = 128) -> torch.Tensor:
    o, i = q.shape
    so, si = scale.shape
    pad = torch.zeros(so * b, si * b)
    pad[:o, :i] = q.float()
    return (pad.view(so, b, si, b) * scale[:, None, :, None]).view(so * b, si * b)[:o, :i]


def test_fp8_block_quantized_checkpoint(tmp_path, model):
    base_cfg, base_sd = model
    qcfg = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    cfg = dict(base_cfg, quantization_config=qcfg, torch_dtype="bfloat16")
    sd = {}
    for k, v in base_sd.items():
        if k.startswith("model.layers.") and k.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            sd[k], sd[k + "_scale_inv"] = quantize_block_fp8(v)
        else:
            sd[k] = v.to(torch.bfloat16)
    assert tuple(sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape) == (5, 2)  # 576 x 256
    assert tuple(sd["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].shape) == (16, 4)  # 2048 x 512
    src = write_sharded(tmp_path / "src", cfg, sd, n_shards=2)
    wm = json.loads((src / INDEX).read_text())["weight_map"]
    k0 = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert wm[k0] != wm[k0 + "_scale_inv"]  # weight and its scale in different shards

    dst = tmp_path / "dst"
    convert(src, dst, "hadamard", seed=1)
    got = load_dir(dst)
    out_cfg = json.loads((dst / "config.json").read_text())
    u = make_rotation("hadamard", 512, seed=1)

    touched = ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    expect_ignored = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        deq = {m: dequantize_in_test(sd[p + m + ".weight"], sd[p + m + ".weight_scale_inv"]) for m in touched}
        a, ln, b = fold_layer(deq["kv_a_proj_with_mqa"], sd[p + "kv_a_layernorm.weight"], deq["kv_b_proj"], u)
        want = {
            p + "kv_a_proj_with_mqa.weight": a.to(torch.bfloat16),
            p + "kv_a_layernorm.weight": ln,
            p + "kv_b_proj.weight": b.to(torch.bfloat16),
            p + "q_a_proj.weight": deq["q_a_proj"].to(torch.bfloat16),
        }
        for k, v in want.items():
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k
        for m in touched:
            assert p + m + ".weight_scale_inv" not in got
        # untouched projections stay fp8 with their scales, bit for bit
        for m in ("q_b_proj", "o_proj"):
            assert got[p + m + ".weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(got[p + m + ".weight"].view(torch.uint8), sd[p + m + ".weight"].view(torch.uint8))
            assert torch.equal(got[p + m + ".weight_scale_inv"], sd[p + m + ".weight_scale_inv"])
        expect_ignored += [p + "kv_a_proj_with_mqa", p + "kv_b_proj", p + "q_a_proj", p + "fused_qkv_a_proj_with_mqa"]
        # the dequantized fold is still the dequantized model, up to bf16 rounding
        kv_b_deq = deq["kv_b_proj"] * sd[p + "kv_a_layernorm.weight"].float()
        rel = (got[p + "kv_b_proj.weight"].double() @ u.T - kv_b_deq.double()).norm() / kv_b_deq.norm()
        assert rel < 1e-2

    qc = out_cfg["quantization_config"]
    assert sorted(qc["ignored_layers"]) == sorted(expect_ignored) and qc["modules_to_not_convert"] == qc["ignored_layers"]
    assert {k: v for k, v in qc.items() if k not in ("ignored_layers", "modules_to_not_convert")} == qcfg
    index = json.loads((dst / INDEX).read_text())
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert not any(k.endswith(("kv_a_proj_with_mqa.weight_scale_inv", "kv_b_proj.weight_scale_inv", "q_a_proj.weight_scale_inv")) for k in index["weight_map"])


def test_fp8_tiny_checkpoint_dequant_dtype_float32(tmp_path):
    """``dequant_dtype='float32'`` keeps the dequantized fold exact (what an fp32 server folds at load);
    the result is the fp32 model on the dequantized weights, folded."""
    from sglang_tpla.tiny_model import build_tiny_fp8_model_dir, dequantize_block_fp8, load_model

    src = build_tiny_fp8_model_dir(tmp_path / "src", seed=4)
    _, raw = load_model(src)
    convert(src, tmp_path / "dst", "hadamard", seed=0, dequant_dtype="float32")
    got = load_dir(tmp_path / "dst")
    u = make_rotation("hadamard", 512, seed=0)
    cfg, deq = load_model(src, dtype=torch.float32)
    want = fold_state_dict(deq, u)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        for m in ("kv_a_proj_with_mqa", "kv_b_proj"):
            assert got[p + m + ".weight"].dtype == torch.float32 and torch.equal(got[p + m + ".weight"], want[p + m + ".weight"])
        assert torch.equal(got[p + "q_a_proj.weight"], dequantize_block_fp8(raw[p + "q_a_proj.weight"], raw[p + "q_a_proj.weight_scale_inv"]))
        assert got[p + "q_b_proj.weight"].dtype == torch.float8_e4m3fn  # untouched: still FP8 with its scales
    assert_logits_close(logits(cfg, {k: v.float() for k, v in load_model(tmp_path / "dst", dtype=torch.float32)[1].items()}), logits(cfg, deq))
    with pytest.raises(ConvertError, match="--dequant-dtype"):
        convert(src, tmp_path / "dst2", "hadamard", dequant_dtype="float8")


# --------------------------------------------------------------------------- (c) refusals


@pytest.fixture(scope="module")
def small_src(tmp_path_factory, model):
    cfg, sd = model
    return write_sharded(tmp_path_factory.mktemp("small") / "src", cfg, sd, n_shards=2)


def test_refuses_non_empty_dst_unless_overwrite(tmp_path, small_src):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    with pytest.raises(ConvertError, match="not empty.*--overwrite"):
        convert(small_src, dst, "hadamard")
    assert (dst / "old.txt").exists()
    convert(small_src, dst, "hadamard", overwrite=True)
    assert not (dst / "old.txt").exists() and (dst / INDEX).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    (tmp_path / "empty").mkdir()
    convert(small_src, tmp_path / "empty", "hadamard")  # an existing empty folder is fine


def test_refuses_already_converted_same_folder_and_bad_options(tmp_path, small_src):
    dst = tmp_path / "once"
    convert(small_src, dst, "hadamard")
    with pytest.raises(ConvertError, match="already converted.*hadamard:seed=0"):
        convert(dst, tmp_path / "twice", "hadamard")
    with pytest.raises(ConvertError, match="--dst is the source folder"):
        convert(small_src, small_src, "hadamard", overwrite=True)
    with pytest.raises(ConvertError, match="inside --src"):
        convert(small_src, small_src / "sub", "hadamard")
    with pytest.raises(ConvertError, match="folds nothing"):
        convert(small_src, tmp_path / "n", "none")
    with pytest.raises(ConvertError, match="needs --calibration"):
        convert(small_src, tmp_path / "p", "pca")
    with pytest.raises(ConvertError, match="only used by --transform pca"):
        convert(small_src, tmp_path / "h", "hadamard", calibration="x.pt")
    assert not any((tmp_path / n).exists() for n in ("twice", "n", "p", "h"))


def test_refuses_non_mla_config(tmp_path, model):
    cfg, sd = model
    llama = {k: v for k, v in cfg.items() if k not in ("kv_lora_rank", "q_lora_rank")}
    llama["architectures"] = ["LlamaForCausalLM"]
    src = save_model(tmp_path / "llama", llama, {"model.embed_tokens.weight": sd["model.embed_tokens.weight"]})
    with pytest.raises(ConvertError, match="not an MLA model.*LlamaForCausalLM"):
        convert(src, tmp_path / "dst", "hadamard")


def test_refuses_missing_or_mismatched_calibration(tmp_path, model, small_src, calib_file):
    cfg, _ = model
    other = random_state_dict(cfg, seed=12)  # same shapes, other weights
    wrong = make_calibration(tmp_path / "other.pt", cfg, other)
    with pytest.raises(ConvertError, match="differs in weights_hash.*--src"):
        convert(small_src, tmp_path / "dst", "pca", calibration=wrong)
    with pytest.raises(ConvertError, match="does not exist"):
        convert(small_src, tmp_path / "dst", "pca", calibration=tmp_path / "missing.pt")
    assert not (tmp_path / "dst").exists()
    # a checkpoint with an MTP layer: pca has no statistics for it unless it is kept
    cfg, sd = model
    src = write_sharded(tmp_path / "mtp", cfg, add_mtp_layer(cfg, sd))
    with pytest.raises(ConvertError, match="--mtp keep"):
        convert(src, tmp_path / "dst", "pca", calibration=calib_file)
    rec = convert(src, tmp_path / "dst", "pca", calibration=calib_file, mtp="keep")
    assert rec["unfolded_layers"] == ["model.layers.2"]


def test_crash_leaves_no_dst(tmp_path, small_src, monkeypatch):
    calls = []

    def boom(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return fold_layer(*a)

    monkeypatch.setattr(conv, "fold_layer", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(small_src, tmp_path / "dst", "hadamard")
    assert list(tmp_path.iterdir()) == []


def test_main_exit_code_and_message(tmp_path, small_src, capsys):
    with pytest.raises(SystemExit) as e:
        conv.main(["--src", str(small_src), "--dst", str(small_src), "--transform", "hadamard"])
    assert e.value.code == 2
    assert "error: --dst is the source folder" in capsys.readouterr().err
