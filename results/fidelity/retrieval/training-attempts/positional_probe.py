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
"""

import sys

import torch
import torch.nn.functional as F

from sglang_tpla.tiny_model import tiny_config
from sglang_tpla.train import TrainableDeepseek, add_embedding_mean


class PlainGPT(torch.nn.Module):
    """The control: a pre-norm GPT of the same width and depth with biases and learned positions (torch.nn)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, heads: int = 2, ctx: int = 128):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.body(self.tok(x) + self.pos(torch.arange(t)), mask=mask, is_causal=True))


def main(mean: float, task: str, steps: int, arch: str = "deepseek") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if arch == "gpt":
        model = PlainGPT()
    else:
        cfg = tiny_config(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, vocab_size=512,
                          intermediate_size=256, torch_dtype="bfloat16")
        model = TrainableDeepseek(cfg).init_weights(0)
        if mean:
            add_embedding_mean(model, mean, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
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
            print(f"{'' if arch == 'deepseek' else 'plain GPT '}mean {mean} {task} step {step} loss {loss.item():.3f}",
                  flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
