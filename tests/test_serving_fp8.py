"""Block-FP8 (DeepSeek-V3 format) served for real on the CPU platform, TP=2.

The tiny DeepSeek-V3 is quantized like the published checkpoints (``build_tiny_fp8_model_dir``:
float8_e4m3fn linears with 128x128 ``weight_scale_inv``).  SGLang serves it with its own
``Fp8LinearMethod`` (the CPU platform runs the block-FP8 GEMM as dequantize + matmul, activations
not quantized), so with ``--dtype float32`` every server equals the fp32 reference model on the
dequantized weights.  TPLA keeps SGLang's FP8 ``q_b_proj`` / ``o_proj`` (activations move over
the head peers) and dequantizes only ``kv_a_proj_with_mqa`` / ``kv_b_proj`` to fold a transform.

Servers start two at a time; each phase collects what its tests need (generations, logs, KV
capacity) and stops its servers before the next phase starts.
"""

import json
import re

import pytest
import torch

from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.convert import convert
from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.serving import ServerProcess
from sglang_tpla.tiny_model import build_tiny_fp8_model_dir, load_model, random_state_dict, save_model, save_tokenizer, tiny_fp8_config
from sglang_tpla.transforms import fold_state_dict

from serving_utils import FP32, NEW_TOKENS, PROMPTS, reference, tpla_mode

pytestmark = pytest.mark.slow

# One fixed budget for every server, and weights counted against it as on a GPU.
BUDGET = {"SGLANG_TPLA_CPU_MEM_GB": "1", "SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS": "1"}
STARTUP = 1800.0  # the shared 2-core CI machine can take many minutes per TP=2 start
LAYERS, R, ROPE, G, HIDDEN = 2, 512, 64, 2, 512


def _tpla_args(g, transform, **extra):
    return FP32 + ["--decode-attention-backend", "tpla", "--json-model-override-args",
                   json.dumps({"tpla": {"g": g, "transform": transform, **extra}})]


def _run(servers: dict) -> dict:
    """Start ``servers`` together, run PROMPTS in order on each, stop them; name -> results."""
    out = {}
    for s in servers.values():
        s.start()
    try:
        for name, s in servers.items():
            s.wait_ready()
            gens = [s.generate(p, NEW_TOKENS) for p in PROMPTS]
            out[name] = {"gens": gens, "log": s.log_text(), "tokens": s.max_total_num_tokens()}
    finally:
        for s in servers.values():
            s.stop()
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    # hidden 512 >= kv_lora_rank: the latent is not rank-deficient by construction (PCA's p_j are real)
    return build_tiny_fp8_model_dir(tmp_path_factory.mktemp("fp8") / "model", seed=2, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


def _server(path, logs, name, args, tp=2):
    return ServerProcess(path, tp=tp, env=BUDGET, args=args, log_path=logs / f"{name}.log", name=name, startup_timeout=STARTUP)


@pytest.fixture(scope="module")
def phase_mla_hadamard(fp8_dir, logs):
    return _run({"mla": _server(fp8_dir, logs, "mla", FP32), "hadamard": _server(fp8_dir, logs, "hadamard", _tpla_args(G, "hadamard"))})


@pytest.fixture(scope="module")
def phase_none(fp8_dir, logs):
    return _run({"none": _server(fp8_dir, logs, "none", _tpla_args(G, "none")), "g1": _server(fp8_dir, logs, "g1", _tpla_args(1, "none"))})


def _pca_calibration(fp8_dir, path):
    """A PCA calibration file computed on the fp32 reference (dequantized weights), with the identity
    the server computes (hash of the dequantized latent rows)."""
    ref = reference(fp8_dir)
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(4, 500, (128,), generator=gen).tolist() for _ in range(6)]  # 768 tokens > 512: full rank
    rows = [ref.sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:R] for i in range(ref.num_layers)]
    ident = ModelIdentity("DeepseekV3ForCausalLM", R, ref.num_layers, weights_hash(rows))
    return Calibration.from_moments(ident, ref.latent_second_moments(windows), num_tokens=768).save(path)


@pytest.fixture(scope="module")
def converted_dir(fp8_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "model"
    convert(fp8_dir, dst, "hadamard", seed=0, dequant_dtype="float32")
    return dst


@pytest.fixture(scope="module")
def calib_file(fp8_dir, tmp_path_factory):
    return _pca_calibration(fp8_dir, tmp_path_factory.mktemp("calib") / "pca.pt")


@pytest.fixture(scope="module")
def phase_converted_pca(converted_dir, fp8_dir, calib_file, logs):
    return _run({
        "converted": _server(converted_dir, logs, "converted", _tpla_args(G, "hadamard")),
        "pca": _server(fp8_dir, logs, "pca", _tpla_args(G, "pca", calibration=str(calib_file))),
    })


def _vs(res, ref, mode):
    rows = []
    for prompt, (toks, lps, meta) in zip(PROMPTS, res["gens"]):
        ref_toks, ref_lps = ref.generate(prompt, NEW_TOKENS, mode)
        rows.append((meta.get("cached_tokens", 0), toks == ref_toks, max(abs(a - b) for a, b in zip(lps, ref_lps))))
    return rows


def _weight_bytes(log: str) -> int:
    found = {int(b) for b in re.findall(r"tpla_cpu: rank weight bytes (\d+)", log)}
    assert len(found) == 1, found  # both ranks hold the same
    return found.pop()


# --------------------------------------------------------------------------- accuracy


def test_fp8_stock_mla_matches_fp32_reference_on_dequantized_weights(phase_mla_hadamard, fp8_dir):
    res = phase_mla_hadamard["mla"]
    assert "quant=fp8" in res["log"]
    rows = _vs(res, reference(fp8_dir), AttentionMode("mla"))
    print("FP8 stock MLA vs fp32 reference (cached, tokens equal, max|dlogprob|):", rows)
    assert rows[1][0] >= 6
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows


@pytest.mark.parametrize("transform", ["hadamard", "none"])
def test_fp8_tpla_g2_pd_sep_matches_fp32_reference(transform, request, fp8_dir):
    res = request.getfixturevalue("phase_mla_hadamard" if transform == "hadamard" else "phase_none")[transform]
    ref = reference(fp8_dir, transform, seed=0)
    rows = _vs(res, ref, tpla_mode("pd_sep", G, ref))
    print(f"FP8 TPLA g=2 {transform} vs fp32 reference (cached, tokens equal, max|dlogprob|):", rows)
    assert rows[1][0] >= 6, "second prompt reuses the cached prefix (exact extend over the sliced pool)"
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows


def test_fp8_tpla_g1_equals_fp8_stock_mla(phase_mla_hadamard, phase_none):
    mla, g1 = phase_mla_hadamard["mla"], phase_none["g1"]
    assert "TPLA on: attn TP 2, g=1" in g1["log"]
    for (t_m, lp_m, _), (t_t, lp_t, _) in zip(mla["gens"], g1["gens"]):
        assert t_t == t_m
        assert max(abs(a - b) for a, b in zip(lp_m, lp_t)) < 1e-4


def test_fp8_tpla_pca_matches_fp32_reference(phase_converted_pca, fp8_dir, calib_file):
    cal = Calibration.load(calib_file)
    cfg, sd = load_model(fp8_dir, dtype=torch.float32)
    ref = ReferenceDeepseek(cfg, fold_state_dict(sd, {i: cal.rotations[i] for i in range(LAYERS)}))
    p = [cal.energy_fractions(i, G).tolist() for i in range(LAYERS)]
    mode = AttentionMode("pd_sep", g=G, mu=[[1.0 / x for x in pj] for pj in p])
    rows = _vs(phase_converted_pca["pca"], ref, mode)
    print("FP8 TPLA g=2 pca vs fp32 reference (cached, tokens equal, max|dlogprob|):", rows, "p_j:", p)
    assert min(min(pj) for pj in p) > 1e-3 and max(max(pj) for pj in p) > 0.55  # PCA concentrates energy; both slices live (full-rank moments)
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows


def test_converted_fp8_checkpoint_serves_like_fold_at_load(phase_converted_pca, phase_mla_hadamard, converted_dir):
    conv, fold = phase_converted_pca["converted"], phase_mla_hadamard["hadamard"]
    assert "checkpoint already converted" in conv["log"] and "dequantized FP8 projections" not in conv["log"]
    qc = json.loads((converted_dir / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.kv_b_proj" in qc["ignored_layers"]  # served unquantized; q_b/o_proj/MLP stay FP8
    for (t_c, lp_c, _), (t_f, lp_f, _) in zip(conv["gens"], fold["gens"]):
        assert t_c == t_f
        assert max(abs(a - b) for a, b in zip(lp_c, lp_f)) < 1e-5


# --------------------------------------------------------------------------- memory


def test_no_qo_weight_copies_and_kv_capacity_at_one_budget(phase_mla_hadamard, phase_none):
    """Weights counted against one fixed budget (as a GPU does): TPLA keeps no q/o copy (its only
    extra weights are its W_UK/W_UV slices, plus the dequantized kv_a/kv_b when it folds a
    transform), they are released before the KV pool is sized, and the KV tokens follow."""
    mla, had, none = phase_mla_hadamard["mla"], phase_mla_hadamard["hadamard"], phase_none["none"]
    w_mla, w_had, w_none = (_weight_bytes(r["log"]) for r in (mla, had, none))
    slices = {float(x) for x in re.findall(r"its own W_UK/W_UV slices ([\d.]+) MiB", none["log"])}
    assert len(slices) == 1
    # 8 heads x (128 x 256 + 256 x 128) fp32 per layer: the kv_b data TPLA re-slices (g=2: all heads, half latent)
    assert slices.pop() == LAYERS * 8 * 2 * 128 * 256 * 4 / 2**20
    assert w_none - w_mla == LAYERS * 8 * 2 * 128 * 256 * 4  # nothing else: no q_b_proj / o_proj copies
    deq = re.search(r"kv_a_proj_with_mqa \+([\d.]+) MiB, kv_b_proj \+([\d.]+) MiB", had["log"])
    assert deq, "hadamard dequantizes kv_a / kv_b to fold"
    extra = w_had - w_none
    assert abs(extra / 2**20 - float(deq.group(1)) - float(deq.group(2))) < 0.02
    for r in (mla, had, none):  # weights (and what TPLA freed) are settled before SGLang sizes the pool
        assert r["log"].index("rank weight bytes") < r["log"].index("max_total_num_tokens=")
    row = {"mla": LAYERS * (R + ROPE) * 4, "tpla": LAYERS * (R // G + ROPE) * 4}  # fp32 KV bytes per token per rank
    n_mla, n_had, n_none = mla["tokens"], had["tokens"], none["tokens"]
    kv_budget = n_mla * row["mla"] + w_mla  # what SGLang had for KV + weights at this budget
    for n, w in ((n_had, w_had), (n_none, w_none)):
        assert abs(n * row["tpla"] + w - kv_budget) <= row["mla"] + row["tpla"]  # same budget, weights paid
    print(
        f"FP8 tiny model, TP=2, 1 GiB budget, weights counted: rank weight bytes MLA {w_mla}, TPLA none {w_none} "
        f"(+{w_none - w_mla}: W_UK/W_UV slices), TPLA hadamard {w_had} (+{w_had - w_none}: kv_a/kv_b dequantized); "
        f"max_total_num_tokens MLA {n_mla}, TPLA none {n_none} ({n_none / n_mla:.3f}x), "
        f"TPLA hadamard {n_had} ({n_had / n_mla:.3f}x); ideal {(R + ROPE) / (R // G + ROPE):.3f}x"
    )
    assert n_none >= 0.97 * (R + ROPE) / (R // G + ROPE) * n_mla


# --------------------------------------------------------------------------- refusals


def _per_tensor_fp8_dir(path):
    """FP8 without block scales (one ``weight_scale`` per tensor): a quantization TPLA cannot fold into."""
    cfg = tiny_fp8_config()
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    sd = {}
    for k, v in random_state_dict(cfg, seed=2).items():
        if k.startswith("model.layers.") and k.endswith("proj.weight") or k.endswith("proj_with_mqa.weight"):
            s = (v.abs().max() / 448.0).clamp_min(1e-12)
            sd[k], sd[k.removesuffix("weight") + "weight_scale"] = (v / s).to(torch.float8_e4m3fn), s.float()
        else:
            sd[k] = v.to(torch.bfloat16)
    save_model(path, cfg, sd)
    return save_tokenizer(path, cfg["vocab_size"])


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, logs):
    base = tmp_path_factory.mktemp("bad")
    per_tensor = _per_tensor_fp8_dir(base / "per_tensor")
    split = build_tiny_fp8_model_dir(base / "six_heads", seed=2, num_attention_heads=6)  # 3 heads x 192 rows per rank
    servers = {
        "per_tensor": _server(per_tensor, logs, "refuse-per-tensor", _tpla_args(1, "hadamard"), tp=1),
        "split": _server(split, logs, "refuse-split", _tpla_args(G, "none")),
    }
    for s in servers.values():
        s.start()
    out = {}
    try:
        for name, s in servers.items():
            code = s.wait_exit(timeout=STARTUP)
            out[name] = (code, s.log_text())
    finally:
        for s in servers.values():
            s.stop()
    return out


def test_quantization_tpla_cannot_fold_is_refused_at_start(refusals):
    code, log = refusals["per_tensor"]
    assert code != 0 and "TPLAQuantError" in log
    assert "folds its latent rotation into kv_a_proj_with_mqa" in log and "transform 'none'" in log


def test_fp8_blocks_that_split_a_rank_head_range_are_refused_at_start(refusals):
    code, log = refusals["split"]
    assert code != 0
    assert "not divisible by weight quantization block_n = 128" in log and "choose a --tp-size" in log
