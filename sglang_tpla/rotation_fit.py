"""The ``fit`` transform: a latent rotation fitted so that every shard's scaled partial logit
predicts the exact logit (this project's own idea; not in the TPLA paper).

Under TPLA each of the ``g`` latent groups runs its own softmax over ``mu_j s_j + rope``,
where ``s_j = (aU)_j . (uU)_j`` is shard ``j``'s partial latent logit (``a`` the absorbed
query with the RMSNorm gain folded in, ``u = c / RMS(c)`` the cached key, ``U`` the
orthogonal transform) and ``s = a . u = sum_j s_j`` the exact one.  Each shard is right when
``g s_j = s``.  Softmax ignores a shift that is the same for every key of a query, so the
error that matters is the part that varies over keys: with the key covariance
``C = E[u u^T] - m m^T`` (``m = E[u]``) and the query second moment ``Q = E[a a^T]``, and
treating query and key as independent,

    E_q Var_k[g s_j - s] = tr(A_j C A_j Q),   A_j = g U P_j U^T - I   (P_j: shard j's coordinates)

``fit_rotation`` minimises ``sum_j tr(A_j C A_j Q) / (g tr(C Q))`` (the error relative to
predicting the logit by zero) over orthogonal ``U = U_0 cayley(W)`` by Adam on the skew part
of ``W``, from the seeded Hadamard ``U_0``.  Hadamard balances the *energy* of every shard;
the fit also aligns the shards' partial logits with each other where queries and keys
actually put their mass.  It is served with ``mu inv_p`` (``mu_j = 1/p_j`` with the shard
energies in the fitted basis, close to ``g``).

``python -m sglang_tpla.rotation_fit --calibration FILE --g 2 4`` adds fitted rotations for
each ``g`` to a calibration file (format 3: it needs the key means and query moments that
``python -m sglang_tpla.calibrate`` records); the server loads them with
``{"tpla": {"transform": "fit", "g": G, "calibration": FILE}}``.

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .transforms import randomized_hadamard


def shard_logit_error(key_cov: torch.Tensor, query_moment: torch.Tensor, rotation: torch.Tensor, g: int) -> torch.Tensor:
    """``sum_j tr(A_j C A_j Q) / (g tr(C Q))`` for ``mu_j = g`` (differentiable in ``rotation``)."""
    d = key_cov.shape[0]
    if d % g:
        raise ValueError(f"g={g} does not divide the latent width {d}")
    w = d // g
    cp = rotation.T @ key_cov @ rotation
    qp = rotation.T @ query_moment @ rotation
    total = torch.trace(key_cov @ query_moment)
    if total <= 0:
        raise ValueError("query and key statistics carry no logit variance; recalibrate on real text")
    diag = (cp * qp).sum(0)  # diag(C' Q') (both symmetric)
    err = torch.zeros((), dtype=cp.dtype)
    for j in range(g):
        blk = slice(j * w, (j + 1) * w)
        a = (cp[blk, blk] * qp[blk, blk]).sum()  # tr(P C' P Q')
        b = diag[blk].sum()  # tr(P C' Q')
        err = err + g * g * a - 2 * g * b + total
    return err / (g * total)


def _cayley(w: torch.Tensor) -> torch.Tensor:
    s = (w - w.T) / 2
    eye = torch.eye(w.shape[0], dtype=w.dtype)
    return torch.linalg.solve(eye - s, eye + s)


def fit_rotation(
    key_cov: torch.Tensor,
    query_moment: torch.Tensor,
    g: int,
    init: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[torch.Tensor, float, float]:
    """Returns ``(U [d, d] float64, error at init, error at the end)``; ``init`` defaults to the
    seeded randomized Hadamard.  Deterministic (float64, fixed start)."""
    c = key_cov.double()
    q = query_moment.double()
    c, q = (c + c.T) / 2, (q + q.T) / 2
    u0 = randomized_hadamard(c.shape[0], seed) if init is None else init.double()
    start = float(shard_logit_error(c, q, u0, g))
    w = torch.zeros_like(c, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    best, best_w = start, torch.zeros_like(c)
    for _ in range(steps):
        err = shard_logit_error(c, q, u0 @ _cayley(w), g)
        e = float(err.detach())
        if e < best:
            best, best_w = e, w.detach().clone()
        opt.zero_grad()
        err.backward()
        opt.step()
    with torch.no_grad():
        u = u0 @ _cayley(best_w)
        # re-orthonormalise away the solve's rounding (polar factor; U is already orthogonal to ~1e-14)
        left, _, right = torch.linalg.svd(u)
        u = left @ right
        end = float(shard_logit_error(c, q, u, g))
    return u, start, end


def fit_calibration(calib, gs, steps: int = 200, seed: int = 0, log=print):
    """Add a fitted rotation per layer for every ``g`` in ``gs`` to ``calib`` (in place)."""
    from .calibration import CALIBRATE_HINT, CalibrationError

    if not calib.has_fit_statistics:
        raise CalibrationError(
            "this calibration file has no key means / query moments (made before format 3); the fit needs them: "
            f"recreate it: {CALIBRATE_HINT}"
        )
    for g in gs:
        rots = []
        t0 = time.time()
        for i in range(calib.identity.num_layers):
            m = calib.key_means[i].double()
            cov = calib.second_moments[i].double() - torch.outer(m, m)
            u, e0, e1 = fit_rotation(cov, calib.query_moments[i], g, steps=steps, seed=seed)
            rots.append(u)
            log(f"[fit] g={g} layer {i + 1}/{calib.identity.num_layers}: shard logit error {e0:.4g} (Hadamard) -> {e1:.4g} "
                f"({time.time() - t0:.0f} s)")
        calib.fitted[int(g)] = rots
    return calib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla.rotation_fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", required=True, help="file from python -m sglang_tpla.calibrate (format 3)")
    ap.add_argument("--g", type=int, nargs="+", required=True, help="latent group counts to fit for (each its own rotation)")
    ap.add_argument("--steps", type=int, default=200, help="Adam steps per layer (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="Hadamard sign seed of the starting point")
    ap.add_argument("--out", help="write here instead of rewriting --calibration")
    args = ap.parse_args(argv)
    from .calibration import Calibration, CalibrationError

    try:
        calib = Calibration.load(args.calibration)
        r = calib.identity.kv_lora_rank
        bad = [g for g in args.g if g < 2 or r % g]
        if bad:
            raise CalibrationError(f"--g {bad}: each g must be >= 2 and divide kv_lora_rank {r}")
        fit_calibration(calib, args.g, args.steps, args.seed)
    except CalibrationError as e:
        print(f"sglang_tpla.rotation_fit: error: {e}", file=sys.stderr)
        return 2
    out = calib.save(args.out or args.calibration)
    print(f"[fit] wrote {out} (fitted rotations for g = {sorted(calib.fitted)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
