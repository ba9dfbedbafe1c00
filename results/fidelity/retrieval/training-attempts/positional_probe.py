"""Can the trainable DeepSeek (no biases) learn positional attention on random tokens?

    PYTHONPATH=. python results/fidelity/retrieval/training-attempts/positional_probe.py MEAN TASK STEPS [gpt]

A 2-layer DeepSeek-V3 with real MLA dims (hidden 128, 2 heads, vocab 512; ``sglang_tpla.train.TrainableDeepseek``
with its init), AdamW lr 3e-3 (betas 0.9/0.95, weight decay 0.1), batches of 16 random-token sequences:

* ``prev``: 64 random tokens; the target at position t is the token at t-1 (a previous-token head).
* ``repeat``: 32 random tokens, then the same 32 again; loss on the repeated half (an induction head, or a
  head that attends 31 positions back: the distance is fixed).
* ``shifted``: as ``repeat`` but with 0-31 random tokens (uniform per sequence) between the two copies and
  random filler after, 96 tokens; loss on the copy after its first token. The distance varies, so only a
  content-matching (induction) head helps.

``MEAN``: ``sglang_tpla.train.add_embedding_mean`` scale (0: the plain init). ``gpt``: train :class:`PlainGPT`
instead (the control; ``MEAN`` is ignored). Prints the loss every 50 steps;
``log 509 = 6.23`` is chance.

Ablation options after the architecture (``key=value``; ``ablation.txt`` has the runs):

* DeepSeek: ``init=torch`` (torch.nn's default init instead of N(0, 0.02)), ``std=S``, ``lr=L``,
  ``rope=plain`` (no yarn scaling) / ``rope=off`` (no rotation), ``pos=learned`` (learned absolute positions
  added to the embeddings; not servable), ``latent_norm=off`` (kv_a/q_a RMSNorm as identities), ``qlora=off``
  (``q_lora_rank`` None), ``latent=fixed`` (``sglang_tpla.train.fix_latent_input``), ``kv=direct``
  (``TrainableDeepseek(direct_kv=True)``, the trainer's ``--kv-parametrization direct``), ``attn=mha`` (each
  layer's MLA replaced by :class:`_MHA`, with ``dqk``/``dv``/``pe``/``scale``/``mha_rope=1``; not servable).
* GPT: ``bias=0``, ``pos=0``.
"""

import sys

import torch
import torch.nn.functional as F

from sglang_tpla.tiny_model import tiny_config
from sglang_tpla.train import TrainableDeepseek, _rope, add_embedding_mean, fix_latent_input


class PlainGPT(torch.nn.Module):
    """The control: a pre-norm GPT of the same width and depth with biases and learned positions (torch.nn)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, heads: int = 2, ctx: int = 128,
                 bias: bool = True, pos: bool = True):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d) if pos else None
        layer = torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True,
                                                 bias=bias)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d, bias=bias), torch.nn.Linear(d, vocab, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
        h = self.tok(x) + (self.pos(torch.arange(t)) if self.pos is not None else 0)
        return self.head(self.body(h, mask=mask, is_causal=True))


class _WithPositions(torch.nn.Module):
    def __init__(self, tok: torch.nn.Embedding, ctx: int = 128):
        super().__init__()
        self.tok, self.pos = tok, torch.nn.Embedding(ctx, tok.weight.shape[1])
        torch.nn.init.normal_(self.pos.weight, std=float(tok.weight.std()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))


class _MHA(torch.nn.Module):
    """Diagnostic: plain multi-head attention (no latent, no RoPE); ``dqk``/``dv`` per head, ``pe`` more key
    dims shared by all heads (as MLA's k_pe; rotated by MLA's RoPE with ``rope``), softmax ``scale`` (None:
    1/sqrt(dqk + pe))."""

    def __init__(self, d: int = 128, heads: int = 2, dqk: int = 64, dv: int = 64, pe: int = 0, scale=None,
                 rope: bool = False):
        super().__init__()
        self.heads, self.dqk, self.dv, self.pe, self.scale, self.rope = heads, dqk, dv, pe, scale, rope
        self.q = torch.nn.Linear(d, heads * (dqk + pe), bias=False)
        self.k = torch.nn.Linear(d, heads * dqk + pe, bias=False)
        self.v = torch.nn.Linear(d, heads * dv, bias=False)
        self.o = torch.nn.Linear(heads * dv, d, bias=False)

    def forward(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, -1)
        k, k_pe = self.k(x).split([h * self.dqk, self.pe], -1)
        if self.pe and self.rope:  # MLA's RoPE on the shared key dims and each head's last pe query dims
            q = torch.cat([q[..., : self.dqk], _rope(q[..., self.dqk :], cos, sin)], -1)
            k_pe = _rope(k_pe[:, :, None], cos, sin)[:, :, 0]
        q = q.transpose(1, 2)
        k = torch.cat([k.view(b, t, h, self.dqk), k_pe[:, :, None].expand(b, t, h, self.pe)], -1).transpose(1, 2)
        v = self.v(x).view(b, t, h, self.dv).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o(o.transpose(1, 2).reshape(b, t, h * self.dv))


def main(mean: float, task: str, steps: int, arch: str = "deepseek", *opts: str) -> None:
    o = dict(kv.split("=", 1) for kv in opts)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if arch == "gpt":
        model = PlainGPT(bias=o.get("bias", "1") == "1", pos=o.get("pos", "1") == "1")
    else:
        over = {"rope_scaling": None} if o.get("rope") == "plain" else {}
        if o.get("qlora") == "off":
            over["q_lora_rank"] = None
        cfg = tiny_config(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, vocab_size=512,
                          intermediate_size=256, torch_dtype="bfloat16", **over)
        model = TrainableDeepseek(cfg, direct_kv=o.get("kv") == "direct")  # --kv-parametrization direct
        if o.get("init", "std") == "std":
            model.init_weights(0, std=float(o.get("std", 0.02)))
        if o.get("latent") == "fixed":  # sglang_tpla.train.fix_latent_input (an isometry into the latent)
            fix_latent_input(model, seed=0)
        if mean:
            add_embedding_mean(model, mean, seed=0)
        if o.get("pos") == "learned":  # diagnostic, not servable: GPT-style learned absolute positions added
            model.model.embed_tokens = _WithPositions(model.model.embed_tokens)
        if o.get("latent_norm") == "off":  # diagnostic: kv_a_layernorm and q_a_layernorm are identities
            for layer in model.model.layers:
                layer.self_attn.kv_a_layernorm.forward = lambda x: x
                if layer.self_attn.q_lora:
                    layer.self_attn.q_a_layernorm.forward = lambda x: x
        if o.get("attn") == "mha":  # diagnostic: standard multi-head attention (no MLA, no RoPE) in each layer
            for layer in model.model.layers:
                layer.self_attn = _MHA(dqk=int(o.get("dqk", 64)), dv=int(o.get("dv", 64)), pe=int(o.get("pe", 0)),
                                       scale=float(o["scale"]) if "scale" in o else None,
                                       rope=o.get("mha_rope") == "1")
        if o.get("rope") == "off":  # diagnostic, not servable: cos 1, sin 0 (no rotation, NoPE)
            import sglang_tpla.train as tr

            tr.rope_cos_sin = lambda cfg, pos: (torch.ones(len(pos), 32), torch.zeros(len(pos), 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(o.get("lr", 3e-3)), betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(1, steps + 1):
        if task == "prev":
            x = torch.randint(3, 512, (16, 64))
            loss = F.cross_entropy(model(x)[:, 1:].flatten(0, 1), x[:, :-1].flatten())
        elif task == "repeat":
            x = torch.randint(3, 512, (16, 32))
            w = torch.cat([x, x], 1)
            nll = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="none").view(16, -1)
            loss = nll[:, 32:].mean()
        else:  # shifted: x, a random gap of 0-31 random tokens, x again, random filler to 96 tokens
            w = torch.randint(3, 512, (16, 96))
            gap = torch.randint(0, 32, (16,))
            mask = torch.zeros(16, 95, dtype=torch.bool)
            for r in range(16):
                g = int(gap[r])
                w[r, 32 + g : 64 + g] = w[r, :32]
                mask[r, 32 + g : 63 + g] = True  # targets w[33+g .. 63+g]: the copy after its first token
            nll = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="none").view(16, -1)
            loss = nll[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"{'' if arch == 'deepseek' else 'plain GPT '}mean {mean} {' '.join(opts)} {task} step {step} "
                  f"loss {loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
