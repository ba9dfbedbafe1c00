"""``python -m sglang_tpla.launch_server [sglang args] --enable-tpla [--tpla-...]``

Translates the TPLA flags and hands over to SGLang's own launcher
(``python -m sglang.launch_server``) with every other flag unchanged:

* ``--enable-tpla`` -> ``--decode-attention-backend tpla``
* ``--tpla-g N``, ``--tpla-transform {none,hadamard,pca,fit}``, ``--tpla-seed S``,
  ``--tpla-calibration FILE``, ``--tpla-mu {one,inv_p,lsq}``, ``--tpla-norm {exact,local}``,
  ``--tpla-prefill {exact,tpla}`` -> merged into
  ``--json-model-override-args`` under ``"tpla"`` (an existing JSON value is kept and extended).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import MU_CHOICES, NORM_CHOICES, PREFILL_CHOICES
from .transforms import TRANSFORM_KINDS


def translate(argv: list[str]) -> list[str]:
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--enable-tpla", action="store_true")
    ap.add_argument("--tpla-g", type=int)
    ap.add_argument("--tpla-transform", choices=TRANSFORM_KINDS)
    ap.add_argument("--tpla-seed", type=int)
    ap.add_argument("--tpla-calibration")
    ap.add_argument("--tpla-mu", choices=MU_CHOICES)
    ap.add_argument("--tpla-norm", choices=NORM_CHOICES)
    ap.add_argument("--tpla-prefill", choices=PREFILL_CHOICES)
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
        raise SystemExit("error: --tpla-* options need --enable-tpla")
    out = list(rest)
    override = json.loads(ours.json_model_override_args) if ours.json_model_override_args else {}
    if ours.enable_tpla:
        if any(a == "--decode-attention-backend" or a.startswith("--decode-attention-backend=") for a in rest):
            raise SystemExit("error: --enable-tpla sets --decode-attention-backend tpla; do not pass both")
        out += ["--decode-attention-backend", "tpla"]
        if opts:
            override["tpla"] = {**override.get("tpla", {}), **opts}
    if override:
        out += ["--json-model-override-args", json.dumps(override)]
    return out


def main(argv=None) -> None:
    args = translate(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    print("[sglang_tpla] exec:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
