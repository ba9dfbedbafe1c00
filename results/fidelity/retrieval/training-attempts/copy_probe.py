"""Does a model copy the looked-up value from its records?  Mean NLL per token class on fresh retrieval documents.

    PYTHONPATH=. python results/fidelity/retrieval/training-attempts/copy_probe.py MODEL_DIR MIN_PAIRS MAX_PAIRS

Documents: ``retrieval.training_document(99, i, n_pairs=(MIN, MAX), n_queries=MAX)`` for i < 40 (every record
is looked up once). Token classes: the looked-up values (``retrieval.answer_spans``), the other lookup
tokens, the values in the records, the other record tokens. A model that copies gives the looked-up values
a much lower NLL than the record values (which it cannot predict); equal NLLs mean no copying.
Exact MLA, fp32 (``sglang_tpla.train.TrainableDeepseek``). Pure PyTorch + tokenizers.
"""

import re
import sys

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from sglang_tpla import retrieval as R
from sglang_tpla.tiny_model import load_model
from sglang_tpla.train import load_trainable


def main(path: str, lo: int, hi: int, n_docs: int = 40) -> None:
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(f"{path}/tokenizer.json")
    cfg, sd = load_model(path, dtype=torch.float32)
    model = load_trainable(cfg, sd).eval()
    classes: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(n_docs):
            text = R.training_document(99, i, n_pairs=(lo, hi), n_queries=hi)
            enc = tok.encode(text)
            ids = torch.tensor([enc.ids])
            nll = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
            first_lookup, spans = text.index(R.LOOKUP), R.answer_spans(text)
            for j, (a, b) in enumerate(enc.offsets[1:]):
                if any(a < y and b > x for x, y in spans):
                    c = "lookup value"
                elif a >= first_lookup:
                    c = "lookup other"
                elif re.fullmatch(r"\s?\d+", text[a:b]):
                    c = "record value"
                else:
                    c = "record other"
                classes.setdefault(c, []).append(float(nll[j]))
    print(f"{path}, {n_docs} documents with {lo}-{hi} records:")
    for c in ("record other", "record value", "lookup other", "lookup value"):
        v = classes[c]
        print(f"  {c:13s} {len(v):5d} tokens, mean NLL {sum(v) / len(v):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
