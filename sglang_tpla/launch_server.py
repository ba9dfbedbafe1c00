"""``python -m sglang_tpla.launch_server [sglang args] --enable-tpla [--tpla-...]``

Translates the TPLA flags and hands over to SGLang's own launcher
(``python -m sglang.launch_server``) with every other flag unchanged:

* ``--enable-tpla`` -> ``--decode-attention-backend tpla``
* ``--tpla-g N``, ``--tpla-transform {none,hadamard,pca,fit}``, ``--tpla-seed S``,
  ``--tpla-calibration FILE``, ``--tpla-mu {one,inv_p,lsq}``, ``--tpla-norm {exact,local}``,
  ``--tpla-prefill {exact,tpla}`` -> merged into
  ``--json-model-override-args`` under ``"tpla"`` (an existing JSON value is kept and extended).

``--help`` prints SGLang's own help followed by these flags (meaning and default).  A
``--tpla-*`` flag this launcher does not know is an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys

from .config import MU_CHOICES, NORM_CHOICES, PREFILL_CHOICES
from .transforms import TRANSFORM_KINDS

PROG = "python -m sglang_tpla.launch_server"
DOCS = "docs/serving.md"

# (flag, argparse keyword arguments); the help text states the meaning and the default.
TPLA_FLAGS: tuple[tuple[str, dict], ...] = (
    ("--enable-tpla", dict(action="store_true", help=(
        "serve decode with TPLA: the same as --decode-attention-backend tpla. Prefill stays exact MLA "
        "unless --tpla-prefill tpla. Default: off (stock MLA)."))),
    ("--tpla-g", dict(type=int, metavar="G", help=(
        "latent groups: each group's ranks keep 512/G latent columns + the 64 RoPE columns of every token. "
        "Must divide the attention TP size and 512 (slice width 512, 256, 128 or 64); the heads must split "
        "evenly over the TP/G ranks of a group. Default: the attention TP size."))),
    ("--tpla-transform", dict(choices=TRANSFORM_KINDS, help=(
        "orthogonal transform folded into the weights before slicing: none, hadamard (seeded, data-free), "
        "pca (needs --tpla-calibration) or fit (a rotation fitted per G on a calibration file; needs "
        "--tpla-calibration and an explicit --tpla-g). Default: hadamard."))),
    ("--tpla-seed", dict(type=int, metavar="S", help="sign seed of the Hadamard transform. Default: 0.")),
    ("--tpla-calibration", dict(metavar="FILE", help=(
        "transform file from python -m sglang_tpla.calibrate, for pca, fit and --tpla-mu lsq (checked against "
        "the served model's identity and checksum). Default: none."))),
    ("--tpla-mu", dict(choices=MU_CHOICES, help=(
        "per-group scale of the partial latent logit: inv_p (1/p_j, the group's share of the latent energy; "
        "G for none/hadamard), one (unscaled) or lsq (least-squares fit on the calibration file's logit pairs; "
        "needs --tpla-calibration). Default: inv_p."))),
    ("--tpla-norm", dict(choices=NORM_CHOICES, help=(
        "RMSNorm of the latent rows written by decode steps: exact (over the full latent) or local (the "
        "paper's slice-local norm). Prefill rows stay exact. Default: exact."))),
    ("--tpla-prefill", dict(choices=PREFILL_CHOICES, help=(
        "exact: prompt tokens run exact MLA, only decode is TPLA (pd-sep); tpla: TPLA everywhere, prompt "
        "tokens also attend over each rank's latent slice (the paper's plain TPLA). Default: exact."))),
)
VALID_FLAGS = tuple(f for f, _ in TPLA_FLAGS)


def tpla_parser(add_help: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, add_help=add_help, allow_abbrev=False,
        description="TPLA flags of the convenience launcher; every other flag goes to python -m sglang.launch_server "
        f"unchanged. The same options as JSON: --json-model-override-args '{{\"tpla\": {{\"g\": 2, ...}}}}' "
        f"with --decode-attention-backend tpla (see {DOCS}).",
    )
    group = ap.add_argument_group("TPLA (sglang_tpla)")
    for flag, kw in TPLA_FLAGS:
        group.add_argument(flag, **kw)
    return ap


def tpla_help() -> str:
    return tpla_parser().format_help()


def _fail(msg: str) -> None:
    sys.stderr.write(f"{PROG}: error: {msg}\n")
    raise SystemExit(2)


def check_unknown_tpla_flags(argv: list[str]) -> None:
    """Refuse a ``--tpla-*`` / ``--enable-tpla*`` flag this launcher does not know (exit 2)."""
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if (name.startswith(("--tpla", "--enable-tpla", "--enable_tpla")) and name not in VALID_FLAGS):
            near = difflib.get_close_matches(name.replace("_", "-"), VALID_FLAGS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            _fail(f"unknown TPLA flag {name}{hint}; valid TPLA flags: {', '.join(VALID_FLAGS)}. "
                  f"See {PROG} --help or {DOCS}.")


def translate(argv: list[str]) -> list[str]:
    check_unknown_tpla_flags(argv)
    ap = tpla_parser()
    ap.add_argument("--json-model-override-args")
    ours, rest = ap.parse_known_args(argv)
    opts = {
        k: v
        for k, v in (
            ("g", ours.tpla_g),
            ("transform", ours.tpla_transform),
            ("seed", ours.tpla_seed),
            ("calibration", ours.tpla_calibration),
            ("mu", ours.tpla_mu),
            ("norm", ours.tpla_norm),
            ("prefill", ours.tpla_prefill),
        )
        if v is not None
    }
    if opts and not ours.enable_tpla:
        given = [f for f in VALID_FLAGS[1:] if any(a == f or a.startswith(f + "=") for a in argv)]
        _fail(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --enable-tpla "
              "(add it, or drop the TPLA flags to serve stock MLA)")
    out = list(rest)
    try:
        override = json.loads(ours.json_model_override_args) if ours.json_model_override_args else {}
    except json.JSONDecodeError as e:
        _fail(f"--json-model-override-args is not valid JSON ({e}); write e.g. '{{\"tpla\": {{\"g\": 2}}}}'")
    if ours.enable_tpla:
        if any(a == "--decode-attention-backend" or a.startswith("--decode-attention-backend=") for a in rest):
            _fail("--enable-tpla sets --decode-attention-backend tpla; pass only one of the two")
        out += ["--decode-attention-backend", "tpla"]
        if opts:
            override["tpla"] = {**override.get("tpla", {}), **opts}
    if override:
        out += ["--json-model-override-args", json.dumps(override)]
    return out


def print_help() -> int:
    """SGLang's own help, then the TPLA flags (last, so they stay on screen)."""
    print(f"{PROG}: SGLang's own launcher plus the TPLA flags (listed at the end, after SGLang's flags).\n", flush=True)
    quiet = "ignore:'python -m sglang.launch_server' is still supported"  # SGLang's hint to use `sglang serve`
    rc = subprocess.call([sys.executable, "-W", quiet, "-m", "sglang.launch_server", "--help"])
    if rc != 0:
        print(f"\n(python -m sglang.launch_server --help exited with {rc}; is sglang==0.5.23 installed?)")
    print("\n" + tpla_help(), flush=True)
    return 0


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    if "-h" in head or "--help" in head:
        raise SystemExit(print_help())
    args = translate(argv)
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    print("[sglang_tpla] exec:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
