"""Driver of the prepared GPU check (``bash tests/gpu/run.sh``): plans the cases, runs a shard of
them with a guard per case, appends one JSON line per case, renders the report.

    python tests/gpu/gpucheck.py plan   [--dry-run]
    python tests/gpu/gpucheck.py run    --out DIR --phase 1|2 [--shard I/N] [--dry-run]
    python tests/gpu/gpucheck.py report --out DIR [--dry-run]

Needs only torch + triton and this tree (``PYTHONPATH`` = the repository root).  ``sglang``,
``sgl_kernel`` and ``flashinfer`` imports are refused here, so a dependency on them fails in the
CPU dry run too, not first on a GPU machine that lacks them.

Phases.  Phase 1 (run by several worker processes at once: Triton compiles are CPU-bound and
dominate a cold run) holds the correctness cases (``numerics``, ``graph``) and one untimed
``warm`` launch per distinct attention kernel specialisation of the benchmarks, which fills the
Triton cache.  Phase 2 (one process, the GPU to itself) measures the copy / GEMM ceilings and
times the attention (``bench``) and layer (``layer``) rows.

Guard.  Every case runs in try/except: an exception becomes an ``ERROR`` record with the traceback
tail and the worker goes on; a CUDA error that breaks the context ends the worker with exit code 3
and ``run.sh`` restarts it, skipping the cases already recorded.

Dry run (``--dry-run``, CPU): ``TRITON_INTERPRET=1``; every case is built on the CPU (correctness
cases at small lengths, benchmark shapes at full size on the ``meta`` device), every Triton launch
goes through :class:`DryLaunch`, which binds the arguments to the kernel's signature, checks the
grid and records the kernel specialisation (what a GPU would compile) without executing, except
the cases marked ``dry_real``, which really run under the interpreter.  CUDA-graph capture is
replaced by eager calls and timings are NaN.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import inspect
import json
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BLOCKED = ("sglang", "sgl_kernel", "flashinfer")


class _BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"import of {name!r} refused: the GPU check must need only torch + triton and this tree")
        return None


sys.meta_path.insert(0, _BlockImports())
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the wrapper accepts CPU tensors

import torch  # noqa: E402

SECTIONS = ("env", "numerics", "graph", "warm", "ceilings", "bench", "layer")


# --------------------------------------------------------------------------- plan


def plan(dry: bool) -> list[dict]:
    """Every job, in run order, each with a unique ``id``, ``section``, ``phase``, ``cost`` (rough
    seconds on a cold GPU machine, for balancing the workers) and ``affinity`` (jobs likely to share
    kernel specialisations go to the same worker)."""
    import check_kernels as ck
    from sglang_tpla.bench.decode_layer import layer_cases
    from sglang_tpla.bench.kernels import attention_cases

    jobs = [dict(section="env", name="env", phase=1, cost=0.1, affinity="env")]
    jobs += ck.numerics_cases()
    jobs += ck.graph_cases()
    bench = attention_cases()
    layer = layer_cases()
    seen = set()
    for c in bench + [lc for lc in layer]:
        key = (c.heads, c.d, c.batch)
        if key in seen:
            continue
        seen.add(key)
        jobs.append(dict(section="warm", name=f"h{c.heads}_d{c.d}_b{c.batch}", phase=1, cost=0.3,
                         affinity=f"bf16-bf16-{c.d}", heads=c.heads, d=c.d, batch=c.batch,
                         attn=_asdict(bench_case_for(c))))  # fmt: skip
    jobs.append(dict(section="ceilings", name="copy_and_gemm", phase=2, cost=3.0, affinity="-"))
    for c in bench:
        jobs.append(dict(section="bench", name=c.name, phase=2, cost=0.4, affinity="-", case=_asdict(c)))
    for c in layer:
        jobs.append(dict(section="layer", name=c.name, phase=2, cost=0.4, affinity="-", case=_asdict(c)))
    for j in jobs:
        j.setdefault("phase", 1)
        j["id"] = f"{j['section']}/{j['name']}"
        if dry and j.get("dry_real"):  # interpreted: by far the slowest dry jobs; spread them over the workers
            j["cost"], j["affinity"] = 10.0, j["id"]
    ids = [j["id"] for j in jobs]
    if len(ids) != len(set(ids)):
        raise AssertionError("duplicate job ids")
    return jobs


def _asdict(c):
    from dataclasses import asdict

    return asdict(c)


def bench_case_for(c):
    """The attention case a layer case's kernel call corresponds to (for warm-up)."""
    from sglang_tpla.bench.kernels import AttnCase

    if isinstance(c, AttnCase):
        return c
    return AttnCase(c.model, c.tp, c.variant, c.par, c.heads, c.d, c.batch, c.context, c.context)


def shard(jobs: list[dict], phase: int, i: int, n: int) -> list[dict]:
    """Jobs of ``phase`` for worker ``i`` of ``n``: affinity groups dealt largest first to the least
    loaded worker (deterministic: every worker computes the same split)."""
    mine = [j for j in jobs if j["phase"] == phase]
    if n <= 1:
        return mine
    groups: dict[str, list[dict]] = {}
    for j in mine:
        groups.setdefault(j["affinity"], []).append(j)
    load = [0.0] * n
    owner = {}
    for aff, js in sorted(groups.items(), key=lambda kv: (-sum(j["cost"] for j in kv[1]), kv[0])):
        w = min(range(n), key=lambda k: (load[k], k))
        owner[aff] = w
        load[w] += sum(j["cost"] for j in js)
    return [j for j in mine if owner[j["affinity"]] == i]


# --------------------------------------------------------------------------- dry-run launches


class DryLaunch:
    """Intercepts ``kernel[grid](...)`` of every Triton kernel in the kernel modules.

    Each launch is bound to the kernel's Python signature (a missing, extra or misnamed argument
    raises here, as it would on the GPU), its grid is checked (x < 2**31, y and z <= 65535), its
    constexprs must be plain values, its tensors must share a device, and its specialisation key
    (constexprs, pointer dtypes and 16-byte alignment, integer ==1 / %16 flags, launch options) is
    recorded: the set of keys is the set of compiles a cold GPU run does.  With ``real`` set the
    launch then runs (under the interpreter)."""

    OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
               "launch_pdl", "debug"}  # fmt: skip

    def __init__(self, record_only: bool = False):
        self.real = record_only
        self.record_only = record_only
        self.keys: set[str] = set()
        self.launches = 0
        self._patched: set[int] = set()

    def patch_loaded_kernels(self) -> list[str]:
        from triton.runtime.jit import KernelInterface

        names = []
        for mname, mod in list(sys.modules.items()):
            if not mname.startswith("sglang_tpla.kernels.") or mod is None:
                continue
            for name, obj in vars(mod).items():
                if isinstance(obj, KernelInterface) and hasattr(obj, "fn") and id(obj) not in self._patched:
                    self._patched.add(id(obj))
                    obj.run = self._wrap(obj, obj.run)
                    names.append(f"{mname}.{name}")
        return names

    def _wrap(self, kern, orig_run):
        sig = inspect.signature(kern.fn)

        def run(*args, grid, warmup, **kwargs):
            self.keys.add(self.check(kern, sig, grid, args, dict(kwargs)))
            self.launches += 1
            if self.real:
                return orig_run(*args, grid=grid, warmup=warmup, **kwargs)
            return None

        return run

    @staticmethod
    def _is_constexpr(p) -> bool:
        import triton.language as tl

        a = p.annotation
        return a is tl.constexpr or (isinstance(a, str) and a.split(".")[-1] == "constexpr")

    def check(self, kern, sig, grid, args, kwargs) -> str:
        import triton.language as tl

        name = kern.fn.__name__
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k not in sig.parameters}
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise TypeError(f"{name}: unknown launch keywords {sorted(unknown)}")
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        g = grid(dict(bound.arguments, **opts)) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(tuple(g)))
        for k, v in enumerate(g):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= (2**31 if k == 0 else 65536):
                raise ValueError(f"{name}: bad grid {g}")
        parts, devices = [], set()
        for pname, p in sig.parameters.items():
            v = bound.arguments[pname]
            if self._is_constexpr(p):
                if not (v is None or isinstance(v, (bool, int, float, str, tl.dtype))):
                    raise TypeError(f"{name}: constexpr {pname}={v!r} ({type(v).__name__}) is not a plain value")
                parts.append(f"{pname}={v!r}")
            elif isinstance(v, torch.Tensor):
                devices.add(v.device.type)
                parts.append(f"{pname}:*{str(v.dtype).removeprefix('torch.')}{'/16' if v.data_ptr() % 16 == 0 else ''}")
            elif isinstance(v, bool) or v is None:
                parts.append(f"{pname}={v!r}")
            elif isinstance(v, int):
                if not -(2**63) <= v < 2**63:
                    raise ValueError(f"{name}: integer {pname}={v} overflows int64")
                parts.append(f"{pname}:{'i64' if not -(2**31) <= v < 2**31 else 'i32'}{'=1' if v == 1 else '/16' if v % 16 == 0 else ''}")
            elif isinstance(v, float):
                if not math.isfinite(v):
                    raise ValueError(f"{name}: float {pname}={v} is not finite")
                parts.append(f"{pname}:fp32")
            else:
                raise TypeError(f"{name}: argument {pname} has type {type(v).__name__}")
        if len(devices) > 1:
            raise ValueError(f"{name}: tensors on several devices {devices}")
        return f"{name}({', '.join(parts)}) {sorted(opts.items())}"


# --------------------------------------------------------------------------- context


class Ctx:
    def __init__(self, dry: bool, rep_ms: float):
        self.dry = dry
        cuda = torch.cuda.is_available() and not dry
        if not dry and not cuda:
            raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
        self.device = torch.device("cuda" if cuda else "cpu")
        # the fp32 reference must be fp32 (no TF32 in its einsums)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.big_device = self.device if cuda else torch.device("meta")  # benchmark shapes, full size
        self.dry_launch = None
        if dry:
            self.timer = self._dry_timer
        else:
            from sglang_tpla.bench.kernels import cudagraph_timer

            self.timer = cudagraph_timer(rep_ms)
        from sglang_tpla.bench.kernels import device_ceilings

        self.spec, self.meas = device_ceilings(self.device)

    @staticmethod
    def _dry_timer(fn):
        fn()
        fn()  # the rotation's second request set
        return math.nan

    def launches_real(self, case: dict) -> bool:
        return not self.dry or bool(case.get("dry_real"))

    @contextlib.contextmanager
    def launch_mode(self, real: bool):
        if self.dry_launch is None:
            yield
            return
        old = self.dry_launch.real
        self.dry_launch.real = real
        try:
            yield
        finally:
            self.dry_launch.real = old


# --------------------------------------------------------------------------- sections


def run_env(job, ctx):
    import platform

    import triton

    rec = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "device": str(ctx.device), "dry": ctx.dry,
           "blocked_imports": list(BLOCKED)}  # fmt: skip
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        rec.update(gpu=p.name, sms=p.multi_processor_count, mem_gb=round(p.total_memory / 2**30, 1),
                   capability=list(torch.cuda.get_device_capability(ctx.device)))  # fmt: skip
    return rec


def run_warm(job, ctx):
    from sglang_tpla.bench.kernels import AttnCase, run_attention_case

    c = AttnCase(**job["attn"])
    with ctx.launch_mode(False):
        return run_attention_case(c, ctx.big_device if ctx.dry else ctx.device, ctx.timer, warm=True)


def run_ceilings(job, ctx):
    """Achieved device-to-device copy bandwidth (read + write bytes) and bf16 GEMM rate."""
    dev = ctx.big_device
    n = 1 << 30  # bytes per buffer
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    if dev.type == "cuda":
        a.normal_()
    t_copy = ctx.timer(lambda: b.copy_(a))
    del a, b
    m = 8192
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16) if dev.type == "cuda" else torch.empty(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn_like(x) if dev.type == "cuda" else torch.empty_like(x)
    z = torch.empty_like(x)
    t_mm = ctx.timer(lambda: torch.mm(x, y, out=z))
    return {"copy_ms": t_copy, "copy_TBps": 2 * n / (t_copy * 1e-3) / 1e12, "gemm_ms": t_mm,
            "gemm_TFLOPs": 2 * m**3 / (t_mm * 1e-3) / 1e12}  # fmt: skip


def run_bench(job, ctx):
    from sglang_tpla.bench.kernels import AttnCase, run_attention_case

    with ctx.launch_mode(False):
        return run_attention_case(AttnCase(**job["case"]), ctx.big_device, ctx.timer, spec=ctx.spec, meas=ctx.meas)


def run_layer(job, ctx):
    from sglang_tpla.bench.decode_layer import LayerCase, run_layer_case

    with ctx.launch_mode(False):
        return run_layer_case(LayerCase(**job["case"]), ctx.big_device, ctx.timer, spec=ctx.spec, meas=ctx.meas)


def _runner(section):
    import check_kernels as ck

    return {"env": run_env, "numerics": ck.run_numerics, "graph": ck.run_graph, "warm": run_warm,
            "ceilings": run_ceilings, "bench": run_bench, "layer": run_layer}[section]  # fmt: skip


def summary_line(rec: dict) -> str:
    import check_kernels as ck

    s = rec["section"]
    try:
        if s == "numerics":
            return ck.numerics_line(rec)
        if s == "graph":
            return ck.graph_line(rec)
        if s == "env":
            return f"torch {rec['torch']} triton {rec['triton']} {rec.get('gpu', rec['device'])}"
        if s == "ceilings":
            return f"copy {rec['copy_TBps']:.2f} TB/s, bf16 GEMM {rec['gemm_TFLOPs']:.0f} TFLOP/s"
        if s == "warm":
            return f"{rec['label']} {rec['heads']}x{rec['d']} batch {rec['batch']} splits {rec['splits']} (compiled)"
        if s in ("bench", "layer"):
            return (f"{rec['label']} {rec['heads']}x{rec['d']} b={rec['batch']} ctx={rec['context']} "
                    f"{rec['ms']:.4f} ms {rec.get('GBps', math.nan):.0f} GB/s {rec.get('TFLOPs', math.nan):.1f} TFLOP/s "
                    f"roof {rec.get('roof_spec', math.nan):.2f}")  # fmt: skip
    except Exception as e:  # noqa: BLE001
        return f"(summary failed: {e!r})"
    return ""


# --------------------------------------------------------------------------- worker


class Results:
    """``results.jsonl``: one line per record, appended with a single ``write`` (several workers)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "results.jsonl")

    def append(self, rec: dict):
        line = (json.dumps(rec, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill
        return out


def _cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def worker(args) -> int:
    dry = args.dry_run
    ctx = Ctx(dry, args.rep_ms)
    i, n = (int(x) for x in args.shard.split("/"))
    tag = f"[p{args.phase} w{i}/{n}]"
    res = Results(args.out)
    # import the kernel modules (a missing one fails the cases that use it, not the worker)
    import_errors = {}
    for mod in ("sglang_tpla.kernels.tpla_decode", "sglang_tpla.kernels.triton_decode"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001
            import_errors[mod] = repr(e)
            print(f"{tag} WARNING: cannot import {mod}: {e!r}", flush=True)
    if dry:
        ctx.dry_launch = DryLaunch()
        patched = ctx.dry_launch.patch_loaded_kernels()
        print(f"{tag} dry run: launches of {', '.join(p.rsplit('.', 1)[-1] for p in patched) or 'nothing'} intercepted", flush=True)
    jobs = shard(plan(dry), args.phase, i, n)
    if args.only:
        jobs = [j for j in jobs if any(o in j["id"] for o in args.only.split(","))]
    done = {r.get("id") for r in res.read()}
    todo = [j for j in jobs if j["id"] not in done]
    print(f"{tag} {len(todo)} jobs ({len(jobs) - len(todo)} already recorded) on {ctx.device}", flush=True)
    t_start = time.time()
    lost = False
    for j in todo:
        t0 = time.time()
        rec = {"id": j["id"], "section": j["section"], "name": j["name"], "worker": f"{args.phase}:{i}/{n}"}
        try:
            out = _runner(j["section"])(j, ctx)
            rec.update(out)
            rec.setdefault("status", "dry" if dry and j["section"] in ("bench", "layer", "ceilings", "warm") else "ok")
        except Exception as e:  # noqa: BLE001 - one case must not stop the others
            tb = traceback.format_exc()
            rec.update(status="ERROR", error=repr(e)[:500], traceback=tb[-3000:])
            if ctx.device.type == "cuda" and not _cuda_alive():
                lost = True
                rec["error"] = "CUDA context lost: " + rec["error"]
        rec["wall_s"] = round(time.time() - t0, 3)
        res.append(rec)
        st = rec["status"]
        line = summary_line(rec) if st in ("ok", "FAIL", "dry") else rec["error"]
        print(f"{tag} {st:5s} {j['id']}  {line}  ({rec['wall_s']:.1f} s)", flush=True)
        if st in ("ERROR", "FAIL") and "traceback" in rec:
            tail = "\n".join("    " + ln for ln in rec["traceback"].strip().splitlines()[-8:])
            print(f"{tag} FAIL {j['id']} traceback (tail):\n{tail}", flush=True)
        if lost:
            print(f"{tag} CUDA context lost; exiting so run.sh restarts this worker", flush=True)
            sys.stdout.flush()
            os._exit(3)
    wrec = {"id": f"worker/{args.phase}:{i}/{n}:{os.getpid()}", "section": "worker", "name": tag, "status": "ok",
            "wall_s": round(time.time() - t_start, 2), "jobs": len(todo), "import_errors": import_errors,
            "sglang_imported": any(m == "sglang" or m.startswith("sglang.") for m in sys.modules)}  # fmt: skip
    if ctx.dry_launch is not None:
        wrec.update(launches=ctx.dry_launch.launches, kernel_keys=sorted(ctx.dry_launch.keys))
    res.append(wrec)
    print(f"{tag} done in {wrec['wall_s']:.1f} s", flush=True)
    return 0


# --------------------------------------------------------------------------- report


EXPLAIN = """\
How to read this report
- numerics: the Triton kernel (`tpla_decode_attention`; `extend_*` cases: `tpla_extend_attention`, one row
  per query token) against the fp32 reference (`sglang_tpla.reference.latent_attention` per request or per
  query token over its causal keys, on the same rounded / dequantized inputs).
  `max|err|` is the largest absolute error over all outputs; a case passes when every element has
  `|out - ref| <= atol + rtol*|ref|` (the `tol` column), `err/tol` is the worst element's share of its
  bound (<= 1 passes), `relL2` = ||out - ref|| / ||ref||.  Outputs are NaN-poisoned before the call
  (unwritten elements fail), empty requests must be exactly 0, the LSE (natural log) must be within
  `lse tol` and -inf for empty requests.
- graph: `TritonTPLADecode.run` captured in a CUDA graph; each replay must equal an eager `run` on the
  same buffers bit for bit (`vs eager`), and the live requests must match the fp32 reference (`vs ref`).
  The padded step leaves requests past the live ones at seq_len 1 on the dummy slot 0, as SGLang pads.
- attention bench: one layer's decode attention on one rank (query length 1), median of CUDA-graph
  replays (`do_bench_cudagraph`), KV not L2-resident (rotating request sets).  MLA and DCP rows run the
  same Triton kernel at D=512 (no FlashInfer/FlashMLA on the machine: that is the comparison available).
  GB/s counts KV + q + o + indices; TFLOP/s counts 2*B*H*tokens*(2D+64); `roof` = roofline time / measured
  time (1.0 = at the roofline), against the H200 datasheet (4.8 TB/s, 989 TFLOP/s) and the achieved
  ceilings of kernels.md §7 (4.3 TB/s, 788 TFLOP/s); `speedup vs MLA` = MLA ms / row ms for the same
  model, TP, batch and context.  DCP rows exclude the LSE exchange between the dcp ranks.
- layer: q_b_proj -> W_UK bmm -> attention -> W_UV bmm -> o_proj on one rank with each variant's per-rank
  weights (bf16), so TPLA's larger per-rank projections (g times the heads of MLA) are in the number.
  `attention ms` is the attention row of the same shape, `rest` the difference.  The all-reduce after
  o_proj, q_a/kv_a projections, RoPE and the KV write are not measured (identical for both variants).
"""


def _fmt(x, f):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, f)


def report(args) -> int:
    dry = args.dry_run
    res = Results(args.out).read()
    jobs = plan(dry)
    by_id: dict[str, dict] = {}
    workers = []
    for r in res:
        if r.get("section") == "worker":
            workers.append(r)
        elif "id" in r:
            by_id[r["id"]] = r  # a rerun's record wins
    missing = [j["id"] for j in jobs if j["id"] not in by_id]
    recs = [by_id[j["id"]] for j in jobs if j["id"] in by_id]
    bad = [r for r in recs if r.get("status") in ("FAIL", "ERROR")]
    env = by_id.get("env/env", {})
    L = []
    mode = "DRY RUN on CPU (built, not measured; timings are NaN)" if dry else env.get("gpu", "?")
    L.append(f"# TPLA decode GPU check: {mode}\n")
    L.append(f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA {env.get('cuda', '?')}, "
             f"python {env.get('python', '?')}; {len(recs)}/{len(jobs)} cases recorded, {len(bad)} failing, "
             f"{len(missing)} missing.\n")  # fmt: skip
    L.append(EXPLAIN)

    num = [r for r in recs if r["section"] == "numerics"]
    L.append("## Numerics: Triton kernel vs fp32 reference\n")
    L.append("| case | D | H | q / kv | splits | mu | max abs err | tol (atol + rtol*abs(ref)) | err/tol | rel L2 | lse err (tol) | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in num:
        if r["status"] == "ERROR":
            L.append(f"| {r['name']} | | | | | | | | | | | ERROR |")
            continue
        lse = f"{_fmt(r.get('lse_max_abs_err'), '.1e')} ({_fmt(r.get('lse_atol'), '.0e')})" if r.get("lse") else "-"
        tol = f"{r['atol']:.0e} + {r['rtol']:.0e}" if "atol" in r else "n/a"
        sp = f"{r['splits']} ({r['splits_used']})" if "splits_used" in r else r["splits"]
        L.append(f"| {r['name']} | {r['d']} | {r['heads']} | {r['q']} / {r['kv']} | {sp} | {r['mu']} | "
                 f"{_fmt(r.get('max_abs_err'), '.2e')} | {tol} | {_fmt(r.get('err_over_tol'), '.2f')} | "
                 f"{_fmt(r.get('rel_l2'), '.1e')} | {lse} | {r['status']} |")  # fmt: skip
    L.append("")

    gr = [r for r in recs if r["section"] == "graph"]
    L.append("## CUDA graph capture / replay of TritonTPLADecode.run\n")
    L.append("| case | D | H | kv | capture bs | splits | step | vs eager (max diff) | vs ref (max abs err) | err/tol | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in gr:
        if r["status"] == "ERROR":
            L.append(f"| {r['name']} | | | | | | | | | | ERROR |")
            continue
        for st in r["steps"]:
            s = ("ok" if st.get("ok") else "FAIL") if "ok" in st else r["status"]
            L.append(f"| {r['name']} | {r['d']} | {r['heads']} | {r['kv']} | {r['capture_bs']} | {r['splits']} | {st['step']} | "
                     f"{_fmt(st.get('graph_vs_eager_max_diff'), '.1e')} | {_fmt(st.get('max_abs_err'), '.2e')} | "
                     f"{_fmt(st.get('err_over_tol'), '.2f')} | {s} |")  # fmt: skip
    L.append("")

    ceil = by_id.get("ceilings/copy_and_gemm")
    if ceil and ceil.get("status") in ("ok", "dry"):
        L.append("## Ceilings measured in this run\n")
        L.append(f"device-to-device copy {_fmt(ceil.get('copy_TBps'), '.2f')} TB/s (read + write bytes); "
                 f"8192^3 bf16 GEMM {_fmt(ceil.get('gemm_TFLOPs'), '.0f')} TFLOP/s.  (kernels.md §7: 4.3 TB/s, 788 TFLOP/s; "
                 f"datasheet 4.8 TB/s, 989 TFLOP/s.)\n")  # fmt: skip

    from sglang_tpla.bench import decode_layer, kernels

    br = [r for r in recs if r["section"] == "bench" and "ms" in r]
    kernels.add_speedups(br)
    L.append("## Per-rank decode attention (one layer, query length 1, bf16)\n")
    L.append(kernels.table(br) if br else "(no rows)")
    L.append("\nSide by side (ms, and MLA ms / ms in parentheses):\n")
    L.append(kernels.side_by_side(br) if br else "(no rows)")
    L.append("")
    lr = [r for r in recs if r["section"] == "layer" and "ms" in r]
    kernels.add_speedups(lr)
    attn_ms = {(r["model"], r["tp"], r["variant"], r["par"], r["batch"], r["context"]): r["ms"] for r in br}
    L.append("## One decode layer step per rank (q_b_proj .. o_proj, bf16; all-reduce not measured)\n")
    L.append(decode_layer.table(lr, attn_ms) if lr else "(no rows)")
    L.append("\nSide by side (layer ms, and MLA ms / ms in parentheses):\n")
    L.append(kernels.side_by_side(lr) if lr else "(no rows)")
    L.append("")

    wsum = [w for w in workers]
    keys = set()
    for w in wsum:
        keys.update(w.get("kernel_keys", []))
    if keys:
        s1 = sum(1 for k in keys if "stage1" in k.split("(")[0])
        L.append("## Kernel specialisations (dry run)\n")
        L.append(f"{len(keys)} distinct Triton kernel specialisations launched ({s1} of them stage 1): the compiles a cold "
                 f"GPU run does (about 1 s per stage-1 compile, well under for stage 2; phase 1 spreads them over "
                 f"the workers).\n")  # fmt: skip
    if any(w.get("sglang_imported") for w in wsum):
        L.append("**sglang was imported by a worker: the GPU machine has no sglang.**\n")

    L.append("## Failures and missing cases\n")
    if not bad and not missing:
        L.append("none\n")
    for r in bad:
        L.append(f"### {r['status']} {r['id']}\n")
        if "traceback" in r:
            L.append("```\n" + "\n".join(r["traceback"].strip().splitlines()[-12:]) + "\n```\n")
        else:
            L.append("```\n" + json.dumps({k: v for k, v in r.items() if k not in ("id",)}, default=str)[:1500] + "\n```\n")
    if missing:
        L.append(f"missing (timed out or crashed before recording): {', '.join(missing)}\n")
    walls = ", ".join(f"{w['name']} {w['wall_s']} s" for w in wsum)
    L.append(f"Worker wall times: {walls or 'n/a'}\n")
    text = "\n".join(L)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    st = {}
    for r in recs:
        st[r["status"]] = st.get(r["status"], 0) + 1
    print(f"SUMMARY: {len(recs)}/{len(jobs)} recorded {st}; {len(bad)} failing, {len(missing)} missing; "
          f"report {os.path.join(args.out, 'report.md')}", flush=True)  # fmt: skip
    return 1 if (bad or missing or any(w.get("sglang_imported") for w in wsum)) else 0


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("plan", "run", "report"))
    ap.add_argument("--out", default=".")
    ap.add_argument("--phase", type=int, default=1)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--only", default="", help="run: only jobs whose id contains one of these comma-separated strings")
    ap.add_argument("--rep-ms", type=float, default=15.0, help="do_bench_cudagraph rep (ms)")
    args = ap.parse_args(argv)
    if args.cmd == "plan":
        for j in plan(args.dry_run):
            print(f"{j['phase']} {j['cost']:4.1f} {j['affinity']:18s} {j['id']}")
        return 0
    if args.cmd == "run":
        return worker(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
