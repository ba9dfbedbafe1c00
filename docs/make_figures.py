"""Make the README picture: which TP rank holds which part of the KV row and which heads.

    python docs/make_figures.py            # writes docs/tpla-layout.png

The layout comes from :class:`sglang_tpla.layout.TPLALayout` (the code the server uses), for
DeepSeek-V3's attention (128 heads, latent 512 + RoPE 64) at TP=4: exact MLA (g=1) next to
TPLA with g=2 and g=4.  Needs matplotlib (in the test extras).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sglang_tpla.layout import TPLALayout  # noqa: E402

TP, HEADS, LATENT, ROPE = 4, 128, 512, 64
GROUP_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")
ROPE_COLOUR = "#8C8C8C"


def draw(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    panels = [(1, "exact MLA, TP=4: every rank keeps the whole 576-wide row"),
              (2, "TPLA, TP=4, g=2: two latent groups of two ranks"),
              (4, "TPLA, TP=4, g=4: every rank its own latent slice, all heads")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 7.2))
    for ax, (g, title) in zip(axes, panels):
        lay = TPLALayout(TP, g, HEADS, LATENT, ROPE)
        for rs in lay.ranks():
            y = TP - 1 - rs.rank
            # the full row as an outline, the kept part filled
            ax.add_patch(Rectangle((0, y + 0.15), LATENT + ROPE, 0.7, fill=False, ec="#BBBBBB", lw=0.8, ls="--"))
            colour = GROUP_COLOURS[rs.group] if g > 1 else "#7A8BA6"
            ax.add_patch(Rectangle((rs.latent_start, y + 0.15), rs.latent_width, 0.7, color=colour, alpha=0.85))
            ax.add_patch(Rectangle((LATENT, y + 0.15), ROPE, 0.7, color=ROPE_COLOUR))
            label = f"[{rs.latent_start}, {rs.latent_end})" if rs.latent_width < 200 else f"latent [{rs.latent_start}, {rs.latent_end})"
            ax.text(rs.latent_start + 6, y + 0.5, label, va="center", ha="left", fontsize=8, color="white")
            where = f"group {rs.group}, " if g > 1 else ""
            ax.text(LATENT + ROPE + 12, y + 0.5,
                    f"{where}heads {rs.head_start}-{rs.head_end - 1} ({rs.num_heads}); row {lay.row_width} of {lay.mla_row_width}",
                    va="center", ha="left", fontsize=8)
            ax.text(-10, y + 0.5, f"rank {rs.rank}", va="center", ha="right", fontsize=9)
        ax.set_xlim(-70, LATENT + ROPE + 330)
        ax.set_ylim(-0.1, TP + 0.1)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_yticks([])
        ax.set_xticks([0, 128, 256, 384, 512, 576])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel("columns of one token's KV row (latent 0-511 after the transform, RoPE key 512-575)")
    handles = [Patch(color=c, label=f"latent group {j}") for j, c in enumerate(GROUP_COLOURS)]
    handles += [Patch(color=ROPE_COLOUR, label="RoPE key (every rank)"), Patch(fill=False, ec="#BBBBBB", ls="--", label="not held")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("Which rank holds what per token (DeepSeek-V3 attention: 128 heads); each rank attends over what it "
                 "holds, the all-reduce sums the ranks", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    out = draw(HERE / "tpla-layout.png")
    print(f"wrote {out}")
