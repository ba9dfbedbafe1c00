"""Fidelity evaluation of TPLA against exact MLA through real SGLang servers.

``python -m sglang_tpla.eval --model-path M --tp N --out RESULTS_DIR`` serves the MLA baseline
once and then every TPLA variant, one server at a time (SGLang's own ``launch_server``, on the
project's CPU platform without a GPU), and for each held-out document

* prefills the first ``--prompt-len`` tokens and **teacher-forces** the next ``--gen-len``
  tokens one DECODE step at a time (pd-sep TPLA is exact in prefill, so its error only shows
  in decode): SGLang's custom logit processor forces the document's token at each step
  (:mod:`sglang_tpla.patches.forced_decode`, which also makes the server return the
  log-probabilities of the unmodified logits) and ``top_logprobs_num = vocab size`` returns
  the full next-token distribution at every position;
* generates ``--gen-len`` tokens greedily from the same prompt.

Per variant: perplexity of the continuation, next-token top-1 agreement with MLA, KL(MLA ||
variant) (mean, early half, late half of the positions), greedy agreement with MLA (first
divergence position, fraction of equal tokens).  Writes ``results.md``, ``results.json`` and
``kl_agreement_vs_position.png`` into ``--out``.

Variants.  Without ``--transforms/--norms/--mu/--modes`` the default list is a curated subset,
per ``g`` in ``--g`` (default 2 4; ``g`` must divide ``--tp``, else skipped):

* ``hadamard g=1`` (folded, unsliced: must equal MLA; once, the sanity row),
* ``identity`` pd-sep (no transform), ``hadamard`` pd-sep with ``mu one`` and with the default
  ``mu inv_p`` (= g for Hadamard), ``hadamard`` TPLA everywhere, ``hadamard`` with local RMSNorm,
* with ``--calibration``: ``pca`` pd-sep with ``mu one``, ``inv_p`` and ``lsq``; ``fit``
  (:mod:`sglang_tpla.rotation_fit`, when the file holds a fit for ``g``), pd-sep and TPLA
  everywhere.

Variant names leave out the defaults (exact RMSNorm, ``mu inv_p``).

With any of those flags given, the variants are the product of the given (or default:
hadamard / exact / inv_p / pd_sep) values for each ``g``.  A variant whose option is missing
(no calibration file, mu ``lsq`` without logit pairs in it, an option this tree's config does
not know) is skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import eval_metrics as M
from .serving import ServerProcess

FORCED_PROCESSOR = "sglang_tpla.patches.forced_decode"


@dataclass(frozen=True)
class Variant:
    name: str
    tpla: dict | None  # None: the MLA baseline
    mode: str = "mla"  # mla | pd_sep | tpla (reference_model mode)

    @property
    def g(self) -> int | None:
        return None if self.tpla is None else self.tpla.get("g")


@dataclass
class Doc:
    prompt: list[int]
    continuation: list[int]


@dataclass
class ServedRun:
    variant: Variant
    forced_tokens: list[list[int]] = field(default_factory=list)
    forced_logprobs: list[list[float]] = field(default_factory=list)  # realised token log-prob per position
    dists: list[torch.Tensor] = field(default_factory=list)  # per doc [N, V] log-probs
    greedy: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- variants


def _config_choices() -> tuple[set, set, set]:
    from . import config

    norms = set(getattr(config, "NORM_CHOICES", ("exact",)))
    mus = set(getattr(config, "MU_CHOICES", ("one",)))
    keys = set(getattr(config, "_KEYS", ()))
    return norms, mus, keys


def variant_name(transform: str, g: int, mode: str, norm: str = "exact", mu: str = "inv_p") -> str:
    name = f"{transform} g={g} {'pd-sep' if mode == 'pd_sep' else 'tpla-everywhere'}"
    if norm != "exact":
        name += f" norm={norm}"
    if mu != "inv_p":  # the served default
        name += f" mu={mu}"
    return name


def make_variant(transform: str, g: int, mode: str, norm: str = "exact", mu: str = "inv_p", seed: int = 0, calibration: str | None = None) -> Variant:
    opts: dict = {"g": g, "transform": "none" if transform == "identity" else transform, "seed": seed}
    if mode == "tpla":
        opts["prefill"] = "tpla"
    if norm != "exact":
        opts["norm"] = norm
    opts["mu"] = mu
    if calibration and (transform in ("pca", "fit") or mu == "lsq"):
        opts["calibration"] = str(calibration)
    return Variant(variant_name(transform, g, mode, norm, mu), opts, mode)


def default_variants(gs, calibration: str | None) -> list[tuple]:
    """(transform, g, mode, norm, mu) of the curated default list."""
    out = [("hadamard", 1, "pd_sep", "exact", "inv_p")]
    for g in gs:
        if g == 1:
            continue
        out += [
            ("identity", g, "pd_sep", "exact", "inv_p"),
            ("hadamard", g, "pd_sep", "exact", "one"),
            ("hadamard", g, "pd_sep", "exact", "inv_p"),
            ("hadamard", g, "tpla", "exact", "inv_p"),
            ("hadamard", g, "pd_sep", "local", "inv_p"),
        ]
        if calibration:
            out += [("pca", g, "pd_sep", "exact", "one"), ("pca", g, "pd_sep", "exact", "inv_p"), ("pca", g, "pd_sep", "exact", "lsq"),
                    ("fit", g, "pd_sep", "exact", "inv_p"), ("fit", g, "tpla", "exact", "inv_p")]
        else:
            out += [("pca", g, "pd_sep", "exact", "inv_p")]  # reported as skipped: needs --calibration
    return out


def parse_variant_spec(spec: str) -> tuple:
    """``TRANSFORM:G:MODE[:NORM[:MU]]``, e.g. ``hadamard:2:pd_sep:local:one``."""
    parts = spec.split(":")
    if not 3 <= len(parts) <= 5:
        raise SystemExit(f"[eval] bad --variant {spec!r}; expected TRANSFORM:G:MODE[:NORM[:MU]]")
    parts += ["exact", "inv_p"][len(parts) - 3 :]
    return (parts[0], int(parts[1]), parts[2], parts[3], parts[4])


def plan_variants(args) -> tuple[list[Variant], list[dict]]:
    """The variants to serve and the skipped ones (with the reason)."""
    custom = any(v is not None for v in (args.transforms, args.norms, args.mu, args.modes))
    if args.variant:
        combos = [parse_variant_spec(s) for s in args.variant]
    elif custom:
        combos = [
            (t, g, m, n, mu)
            for g in args.g
            for t in (args.transforms or ["hadamard"])
            for m in (args.modes or ["pd_sep"])
            for n in (args.norms or ["exact"])
            for mu in (args.mu or ["inv_p"])
        ]
    else:
        combos = default_variants(args.g, args.calibration)
    norms, mus, keys = _config_choices()
    calib = None
    if args.calibration:
        try:
            from .calibration import Calibration

            calib = Calibration.load(args.calibration)
        except Exception as e:  # noqa: BLE001
            print(f"[eval] calibration file {args.calibration} could not be read: {e}", flush=True)
    run, skipped, seen = [], [], set()
    for t, g, mode, norm, mu in combos:
        v = make_variant(t, g, mode, norm, mu, args.seed, args.calibration)
        if v.name in seen:
            continue
        seen.add(v.name)
        reason = None
        if args.tp % g:
            reason = f"g={g} does not divide --tp {args.tp} (g={g} needs TP a multiple of {g})"
        elif mode == "tpla" and "prefill" not in keys:
            reason = "this tree's config has no 'prefill' option (TPLA everywhere)"
        elif norm not in norms:
            reason = f"norm {norm!r} is not available in this tree's config (choices {sorted(norms)})"
        elif mu not in mus:
            reason = f"mu {mu!r} is not available in this tree's config (choices {sorted(mus)})"
        elif t in ("pca", "fit") and not args.calibration:
            reason = f"{t} needs --calibration FILE (python -m sglang_tpla.calibrate)"
        elif t == "fit" and calib is not None and g not in calib.fitted:
            reason = f"calibration file {args.calibration} holds no fitted rotation for g={g} (python -m sglang_tpla.rotation_fit --g {g})"
        elif mu == "lsq" and not args.calibration:
            reason = "mu lsq needs --calibration FILE with logit pairs"
        elif mu == "lsq" and calib is not None and not getattr(calib, "has_lsq", False):
            reason = f"calibration file {args.calibration} holds no logit pairs for mu lsq"
        elif (t in ("pca", "fit") or mu == "lsq") and calib is None:
            reason = f"calibration file {args.calibration} could not be read"
        if reason:
            print(f"[eval] skip {v.name}: {reason}", flush=True)
            skipped.append({"variant": v.name, "reason": reason})
        else:
            run.append(v)
    return run, skipped


# --------------------------------------------------------------------------- data


def _read_docs(path: Path, model_path: str) -> list[list[int]]:
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        items = json.loads(path.read_text())
        if isinstance(items, dict):
            items = items.get("docs") or items.get("documents") or items.get("ids") or items.get("texts") or []
    else:
        items = [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    docs, tok = [], None
    for it in items:
        if isinstance(it, dict):
            it = it.get("ids") or it.get("input_ids") or it.get("text")
        if isinstance(it, str):
            if tok is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(model_path)
            it = tok.encode(it, add_special_tokens=False)
        docs.append([int(x) for x in it])
    return docs


def find_heldout(model_path: str) -> Path | None:
    root = Path(model_path)
    for pat in ("heldout*.jsonl", "heldout*.json", "heldout*.txt", "*/heldout*.jsonl", "*/heldout*.json", "*/heldout*.txt"):
        hits = sorted(root.glob(pat))
        if hits:
            return hits[0]
    return None


def load_docs(data: str, model_path: str, num_docs: int, prompt_len: int, gen_len: int, vocab: int, seed: int = 0) -> tuple[list[Doc], str]:
    """``heldout`` (a ``heldout*`` file in the model folder), a path, or ``random`` (seeded uniform
    token ids, for models without data).  Documents shorter than ``prompt_len + gen_len`` are dropped."""
    if data == "random":
        gen = torch.Generator().manual_seed(seed)
        raw = [torch.randint(4, vocab, (prompt_len + gen_len,), generator=gen).tolist() for _ in range(num_docs)]
        source = f"random token ids (seed {seed})"
    else:
        path = find_heldout(model_path) if data == "heldout" else Path(data)
        if path is None or not path.exists():
            raise SystemExit(f"[eval] no held-out data: {data!r} (looked for heldout* in {model_path}); pass --data FILE or --data random")
        raw = _read_docs(path, model_path)
        source = str(path)
    need = prompt_len + gen_len
    docs = [Doc(d[:prompt_len], d[prompt_len:need]) for d in raw if len(d) >= need][:num_docs]
    if not docs:
        raise SystemExit(f"[eval] no document in {source} has {need} tokens (--prompt-len + --gen-len)")
    return docs, source


# --------------------------------------------------------------------------- serving


def server_args(variant: Variant, dtype: str) -> list[str]:
    args = ["--dtype", dtype, "--enable-custom-logit-processor", "--disable-overlap-schedule", "--disable-radix-cache"]
    if variant.tpla is not None:
        args += ["--decode-attention-backend", "tpla", "--json-model-override-args", json.dumps({"tpla": variant.tpla})]
    return args


def forced_request(server: ServerProcess, doc: Doc, vocab: int) -> tuple[list[int], list[float], torch.Tensor]:
    """Prefill ``doc.prompt``, force ``doc.continuation`` one decode step at a time; returns the
    tokens the server produced (must be the continuation), their log-probs, ``[N, V]`` log-probs."""
    from .patches.forced_decode import PARAM, ForcedTokensProcessor

    out = server.post(
        "/generate",
        {
            "input_ids": list(doc.prompt),
            "sampling_params": {
                "max_new_tokens": len(doc.continuation), "temperature": 0, "ignore_eos": True,
                "custom_params": {PARAM: list(doc.continuation)},
            },
            "custom_logit_processor": ForcedTokensProcessor.to_str(),
            "return_logprob": True,
            "top_logprobs_num": vocab,
        },
    )
    meta = out["meta_info"]
    toks = [int(t[1]) for t in meta["output_token_logprobs"]]
    lps = [float(t[0]) for t in meta["output_token_logprobs"]]
    return toks, lps, M.dense_logprobs(meta["output_top_logprobs"], vocab)


def run_variant(variant: Variant, args, docs: list[Doc], vocab: int, log_dir: Path, env: dict) -> ServedRun:
    t0 = time.time()
    res = ServedRun(variant)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in variant.name)
    print(f"[eval] starting server: {variant.name} (tp={args.tp}) ...", flush=True)
    with ServerProcess(args.model_path, tp=args.tp, args=server_args(variant, args.dtype), env=env,
                       log_path=log_dir / f"{safe}.log", name=f"eval-{safe}",
                       startup_timeout=args.startup_timeout) as srv:
        print(f"[eval]   ready after {time.time() - t0:.0f} s; {len(docs)} docs x (forced {len(docs[0].continuation)} + greedy {args.gen_len})", flush=True)
        from tqdm import tqdm

        bar = dict(total=len(docs), unit="doc", file=sys.stderr, leave=False, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as ex:
            forced = list(tqdm(ex.map(lambda d: forced_request(srv, d, vocab), docs), desc="  teacher-forced", **bar))
            greedy = list(tqdm(ex.map(lambda d: srv.generate(d.prompt, args.gen_len)[0], docs), desc="  greedy", **bar))
    for doc, (toks, lps, dist) in zip(docs, forced):
        if toks != doc.continuation:
            raise RuntimeError(f"[eval] {variant.name}: forcing failed (server produced {toks[:8]}..., wanted {doc.continuation[:8]}...)")
        res.forced_tokens.append(toks)
        res.forced_logprobs.append(lps)
        res.dists.append(dist)
    res.greedy = greedy
    res.seconds = time.time() - t0
    print(f"[eval]   done in {res.seconds:.0f} s", flush=True)
    return res


# --------------------------------------------------------------------------- metrics


def summarize(run: ServedRun, base: ServedRun) -> dict:
    """Per-variant metrics against the MLA baseline (all positions of all documents pooled)."""
    kl_pos, agree_pos, greedy_pos = [], [], []
    first_div, frac_eq = [], []
    lps = [lp for doc in run.forced_logprobs for lp in doc]
    for d_run, d_base, g_run, g_base in zip(run.dists, base.dists, run.greedy, base.greedy):
        kl_pos.append(M.kl_per_position(d_base, d_run))
        agree_pos.append(M.top1_agreement(d_base, d_run))
        greedy_pos.append(torch.tensor([float(a == b) for a, b in zip(g_run, g_base)], dtype=torch.float64))
        first_div.append(M.first_divergence(g_run, g_base))
        frac_eq.append(M.equal_fraction(g_run, g_base))
    kl = torch.stack(kl_pos).mean(0).tolist()  # mean over documents, per position
    agree = torch.stack(agree_pos).mean(0).tolist()
    greedy_agree = torch.stack(greedy_pos).mean(0).tolist()
    edges = M.early_late_edges(len(kl))
    kl_early, kl_late = M.bucket_means(kl, edges)
    ag_early, ag_late = M.bucket_means(agree, edges)
    return {
        "variant": run.variant.name,
        "tpla": run.variant.tpla,
        "mode": run.variant.mode,
        "perplexity": M.perplexity(lps),
        "top1_agreement": sum(agree) / len(agree),
        "top1_agreement_early": ag_early,
        "top1_agreement_late": ag_late,
        "kl_mean": sum(kl) / len(kl),
        "kl_early": kl_early,
        "kl_late": kl_late,
        "kl_max": float(torch.stack(kl_pos).max()),
        "max_abs_dlogprob": float(max((r - b).abs().max() for r, b in zip(
            [torch.tensor(x) for x in run.forced_logprobs], [torch.tensor(x) for x in base.forced_logprobs]))),
        "greedy_first_divergence_mean": sum(first_div) / len(first_div),
        "greedy_first_divergence_min": min(first_div),
        "greedy_first_divergence": first_div,
        "greedy_equal_fraction": sum(frac_eq) / len(frac_eq),
        "seconds": run.seconds,
        "per_position": {"kl": kl, "top1_agreement": agree, "greedy_agreement": greedy_agree},
    }


def reference_mode(variant: Variant, num_layers: int, calib=None):
    """The fp32 reference's (rotations key, rotations, AttentionMode) for a variant, or None if it
    has no reference here (pca / fit / mu lsq without the calibration file)."""
    from .reference_model import AttentionMode

    if variant.tpla is None:
        return "none", None, AttentionMode("mla")
    t, g = variant.tpla["transform"], variant.tpla["g"]
    mu, norm = variant.tpla.get("mu", "inv_p"), variant.tpla.get("norm", "exact")
    from_file = t in ("pca", "fit")
    if (from_file or mu == "lsq") and calib is None:
        return None
    rots = calib.rotations_for(t, g) if from_file else None
    if from_file:
        p = [calib.shard_energy_fractions(i, g, t) for i in range(num_layers)]
    else:
        p = [torch.full((g,), 1.0 / g, dtype=torch.float64)] * num_layers
    scales = None
    if g > 1 and mu == "inv_p":
        scales = [[1.0 / float(x) for x in pi] for pi in p]
    elif g > 1 and mu == "lsq":
        basis = rots if from_file else ([_data_free_rotation(t, calib.identity.kv_lora_rank, variant.tpla.get("seed", 0))]
                                        * num_layers)
        scales = calib.logit_scales("lsq", g, basis, norm, pca_fractions=False) if norm == "exact" else None
        if scales is None:
            return None  # lsq with local norm: not mirrored here
    key = f"{t}:g={g}" if t == "fit" else t
    energy = [[float(x) for x in pi] for pi in p] if (norm == "local" and from_file) else None
    return key, rots, AttentionMode(variant.mode, g=g, norm=norm, mu=scales, energy_fractions=energy)


def _data_free_rotation(kind: str, d: int, seed: int):
    """The rotation of a transform that needs no calibration file (None for 'none')."""
    from .transforms import make_rotation

    return None if kind == "none" else make_rotation(kind, d, seed=seed)


def reference_model_for(cfg: dict, sd: dict, key: str, rots, seed: int = 0):
    """The fp32 :class:`~sglang_tpla.reference_model.ReferenceDeepseek` for a :func:`reference_mode` key:
    ``sd`` (fp32) with the variant's transform folded in (``rots`` per layer from the calibration file,
    else the data-free rotation ``key`` names; ``none``: the weights as they are)."""
    from .reference_model import ReferenceDeepseek
    from .transforms import fold_state_dict

    if rots is not None:
        w = fold_state_dict(sd, dict(enumerate(rots)))
    elif key == "none":
        w = sd
    else:
        w = fold_state_dict(sd, _data_free_rotation(key, cfg["kv_lora_rank"], seed))
    return ReferenceDeepseek(cfg, w)


def reference_check(model_path: str, runs: dict, docs: list[Doc], seed: int = 0, calibration: str | None = None) -> dict[str, float]:
    """Max |served - fp32 reference| over the full teacher-forced distributions, per variant
    (dense models only): the reference's ``score(ids, prompt_len, mode)``, row ``P-1+k`` for
    forced position ``k``."""
    from .tiny_model import load_model

    cfg, sd = load_model(model_path, dtype=torch.float32)
    calib = None
    if calibration:
        from .calibration import Calibration

        calib = Calibration.load(calibration)
    models: dict = {}
    out = {}
    for name, run in runs.items():
        rm = reference_mode(run.variant, cfg["num_hidden_layers"], calib)
        if rm is None:
            continue
        key, rots, mode = rm
        if key not in models:
            models[key] = reference_model_for(cfg, sd, key, rots, seed)
        worst = 0.0
        for doc, dist in zip(docs, run.dists):
            ids, p = doc.prompt + doc.continuation, len(doc.prompt)
            want = torch.log_softmax(models[key].score(ids, p, mode).double(), -1)[p - 1 : len(ids) - 1]
            worst = max(worst, float((dist.double() - want).abs().max()))
        out[name] = worst
        print(f"[eval] reference check {name}: max |served - fp32 reference| {worst:.2e}", flush=True)
    return out


# --------------------------------------------------------------------------- reports


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + (" (+ uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def write_markdown(path: Path, meta: dict, rows: list[dict], skipped: list[dict]) -> None:
    lines = [
        "# TPLA fidelity vs exact MLA (real SGLang servers, teacher-forced decode)",
        "",
        f"- date: {meta['date']}",
        f"- git commit: {meta['commit']}",
        f"- command: `{meta['command']}`",
        f"- model: {meta['model_path']} (TP={meta['tp']}, dtype {meta['dtype']}); data: {meta['data']}",
        f"- {meta['num_docs']} documents, prompt {meta['prompt_len']} tokens (prefilled), continuation {meta['gen_len']} tokens "
        "teacher-forced one decode step at a time; greedy generation of the same length from the same prompt",
        f"- MLA baseline perplexity: {meta['mla_perplexity']:.4f}",
        "",
        "Position k predicts continuation token k; k = 0 comes from the prefill (exact MLA in pd-sep), k >= 1 from decode "
        "steps. KL(MLA || variant) in nats over the full vocabulary, mean over documents; early = first half of the "
        "positions, late = second half. Top-1: the variant's most likely next token equals MLA's (teacher-forced). "
        "Greedy: first position where the variant's greedy output differs from MLA's (mean over documents; "
        f"{meta['gen_len']} = never) and the fraction of equal tokens.",
        "",
        "| variant | ppl | top-1 agree | top-1 early / late | KL mean | KL early | KL late | greedy 1st div (mean / min) | greedy equal | max abs dlogprob |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.4f} | {r['top1_agreement']:.4f} | {r['top1_agreement_early']:.3f} / "
            f"{r['top1_agreement_late']:.3f} | {r['kl_mean']:.3e} | {r['kl_early']:.3e} | {r['kl_late']:.3e} | "
            f"{r['greedy_first_divergence_mean']:.1f} / {r['greedy_first_divergence_min']} | {r['greedy_equal_fraction']:.3f} | "
            f"{r['max_abs_dlogprob']:.2e} |"
        )
    checked = [r for r in rows if r.get("reference_max_abs_diff") is not None]
    if checked:
        lines += ["", "Served vs fp32 reference model (same mode, teacher-forced, full distributions): max |dlogprob|", ""]
        lines += [f"- {r['variant']}: {r['reference_max_abs_diff']:.2e}" for r in checked]
    if meta.get("latent_spectrum"):
        lines += ["", "Latent energy captured by the top-k PCA components of the calibration file, per layer "
                  "(a latent whose energy sits in few directions makes PCA slicing nearly exact; the fit and "
                  "Hadamard spread those directions over the groups):", "",
                  "| layer | top 16 | top 64 | top 128 | top 256 |", "|---|---|---|---|---|"]
        lines += [f"| {i} | " + " | ".join(f"{x:.4f}" for x in row) + " |" for i, row in enumerate(meta["latent_spectrum"])]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s['variant']}: {s['reason']}" for s in skipped]
    path.write_text("\n".join(lines) + "\n")


def latent_spectrum(calibration: str, ks=(16, 64, 128, 256)) -> list[list[float]] | None:
    """Per layer the share of latent energy in the top-k PCA components of a calibration file."""
    try:
        from .calibration import Calibration

        cal = Calibration.load(calibration)
    except Exception:  # noqa: BLE001 - the report is still useful without it
        return None
    out = []
    for ev in cal.eigenvalues:
        ev = ev.double().clamp_min(0)
        out.append([float(ev[:k].sum() / ev.sum()) for k in ks])
    return out


def write_plot(path: Path, rows: list[dict], n_bins: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for r in rows:
        if r["variant"] == "MLA":
            continue
        pp = r["per_position"]
        x, a = M.binned(pp["top1_agreement"], n_bins)
        ax1.plot(x, a, marker="o", ms=3, label=r["variant"])
        x, k = M.binned(pp["kl"], n_bins)
        ax2.plot(x, [max(v, 1e-12) for v in k], marker="o", ms=3, label=r["variant"])
    ax1.set_ylabel("top-1 agreement with MLA")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("KL(MLA || variant), nats")
    ax2.set_xlabel("continuation position (teacher-forced decode step)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--g", type=int, nargs="+", default=[2, 4])
    p.add_argument("--transforms", nargs="+", choices=["identity", "hadamard", "pca", "fit"])
    p.add_argument("--calibration", help="transform file (python -m sglang_tpla.calibrate): enables pca, fit and mu lsq")
    p.add_argument("--norms", nargs="+", choices=["exact", "local"])
    p.add_argument("--mu", nargs="+", choices=["one", "inv_p", "lsq"])
    p.add_argument("--modes", nargs="+", choices=["pd_sep", "tpla"], help="pd_sep: exact prefill; tpla: TPLA everywhere")
    p.add_argument("--variant", action="append", help="explicit variant TRANSFORM:G:MODE[:NORM[:MU]] (repeatable; overrides the lists above)")
    p.add_argument("--seed", type=int, default=0, help="Hadamard sign seed")
    p.add_argument("--data", default="heldout", help="'heldout' (heldout* in the model folder), a file (.txt/.json/.jsonl), or 'random'")
    p.add_argument("--num-docs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    p.add_argument("--startup-timeout", type=float, default=1200.0, help="seconds to wait for each server")
    p.add_argument("--cpu-mem-gb", default="1", help="SGLANG_TPLA_CPU_MEM_GB for the CPU platform (KV budget)")
    p.add_argument("--save-dists", action="store_true", help="also write distributions.pt (full [N, V] log-probs per doc and variant)")
    p.add_argument("--check-reference", action="store_true", help="compare every served distribution with the fp32 reference model (dense models)")
    p.add_argument("--out", required=True)
    return p


def run_eval(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.model_path = str(Path(args.model_path).resolve())  # the servers run in the log folder
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    if not (Path(args.model_path) / "config.json").is_file():
        raise SystemExit(f"[eval] --model-path {args.model_path} has no config.json; pass a local HF checkpoint folder "
                         "(e.g. tests/assets/tiny-deepseek-trained)")
    vocab = json.loads((Path(args.model_path) / "config.json").read_text())["vocab_size"]
    docs, source = load_docs(args.data, args.model_path, args.num_docs, args.prompt_len, args.gen_len, vocab, args.seed)
    variants, skipped = plan_variants(args)
    print(f"[eval] {len(docs)} docs from {source}; variants: MLA + {[v.name for v in variants]}", flush=True)
    env = {"SGLANG_TPLA_CPU_MEM_GB": str(args.cpu_mem_gb)}
    import sglang_tpla.patches.forced_decode  # noqa: F401 - imports sglang's processor base once, before any timing
    t_all = time.time()
    base = run_variant(Variant("MLA", None, "mla"), args, docs, vocab, log_dir, env)
    rows = [summarize(base, base)]
    runs = {"MLA": base}
    for i, v in enumerate(variants, 1):
        done = time.time() - t_all  # every server so far (MLA included) took about the same time
        print(f"[eval] variant {i}/{len(variants)}: {done / 60:.1f} min so far, ETA {done / i * (len(variants) - i + 1) / 60:.1f} min "
              "for the remaining servers", flush=True)
        try:
            runs[v.name] = r = run_variant(v, args, docs, vocab, log_dir, env)
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
            print(f"[eval] FAILED {v.name}: {e}", flush=True)
            skipped.append({"variant": v.name, "reason": f"failed: {str(e).splitlines()[0][:300]}"})
            continue
        rows.append(summarize(r, base))
        print(f"[eval]   {v.name}: ppl {rows[-1]['perplexity']:.4f}, top-1 {rows[-1]['top1_agreement']:.4f}, "
              f"KL {rows[-1]['kl_mean']:.3e}, greedy equal {rows[-1]['greedy_equal_fraction']:.3f}", flush=True)
    if args.check_reference:
        try:
            ref = reference_check(args.model_path, runs, docs, args.seed, args.calibration)
            for r in rows:
                r["reference_max_abs_diff"] = ref.get(r["variant"])
        except Exception as e:  # noqa: BLE001 - e.g. an MoE model the dense reference does not cover
            print(f"[eval] reference check not possible: {e}", flush=True)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "command": " ".join(["python -m sglang_tpla.eval", *(argv if argv is not None else sys.argv[1:])]),
        "model_path": args.model_path, "tp": args.tp, "dtype": args.dtype, "data": source,
        "num_docs": len(docs), "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "mla_perplexity": rows[0]["perplexity"], "out": str(out),
        "latent_spectrum": latent_spectrum(args.calibration) if args.calibration else None,
    }
    result = {"meta": meta, "results": rows, "skipped": skipped,
              "docs": [asdict(d) for d in docs]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "results.md", meta, rows, skipped)
    write_plot(out / "kl_agreement_vs_position.png", rows)
    if args.save_dists:  # full per-position log-prob distributions, for offline checks
        torch.save({name: {"dists": [d.float() for d in r.dists], "greedy": r.greedy, "tpla": r.variant.tpla, "mode": r.variant.mode}
                    for name, r in runs.items()} | {"_docs": [asdict(d) for d in docs]}, out / "distributions.pt")
    print((out / "results.md").read_text(), flush=True)
    result["runs"] = runs  # in-process callers (tests) get the raw distributions too
    return result


def main(argv: list[str] | None = None) -> None:
    run_eval(argv)


if __name__ == "__main__":
    main()
