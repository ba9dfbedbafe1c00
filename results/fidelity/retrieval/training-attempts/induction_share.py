"""How many looked-up value tokens would plain one-token-back induction predict?  (No model: tokenisation only.)

    PYTHONPATH=. python results/fidelity/retrieval/training-attempts/induction_share.py MODEL_DIR

For every token of a looked-up value (``retrieval.answer_spans``), in
``retrieval.training_document(99, i, n_pairs=(k, k), n_queries=k)`` for i < 200: do all earlier occurrences of
the previous token have this token after them?  If so, an induction head (attend to the token after an
earlier copy of the current one) gets it right without matching the key.
"""

import sys

from tokenizers import Tokenizer

from sglang_tpla import retrieval as R


def main(path: str) -> None:
    tok = Tokenizer.from_file(f"{path}/tokenizer.json")
    for k in (2, 4, 12):
        hit = total = 0
        for i in range(200):
            text = R.training_document(99, i, n_pairs=(k, k), n_queries=k)
            enc, spans = tok.encode(text), R.answer_spans(text)
            ids = enc.ids
            for t in range(1, len(ids)):
                a, b = enc.offsets[t]
                if not any(a < y and b > x for x, y in spans):
                    continue
                after = {ids[s + 1] for s in range(t - 1) if ids[s] == ids[t - 1]}
                total += 1
                hit += after == {ids[t]}
        print(f"{k} records: {hit}/{total} = {hit / total:.3f} of the looked-up value tokens")


if __name__ == "__main__":
    main(sys.argv[1])
