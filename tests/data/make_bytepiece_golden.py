"""Regenerate tests/data/bytepiece_golden.json: token ids produced by the reference ``bytepiece`` package.

Run from the repository root with the reference installed (``pip show bytepiece`` -> 0.6.3):

    PYTHONPATH=$PWD python tests/data/make_bytepiece_golden.py

Four tiny models are trained with the reference ``bytepiece.Trainer`` (not ours) on the start of the embedded corpus
plus the Chinese lines below, one per ``isolate_digits`` x ``ensure_unicode`` setting; the golden ids are the
reference ``Tokenizer.encode`` of diverse texts. Ids of the released 40k model (../shared/data) are added for a
few texts when that file is present.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys

import bytepiece

from hf_su.data import embedded_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "bytepiece_golden.json")
ROOT = os.path.dirname(os.path.dirname(HERE))


def shared_data(name: str) -> str | None:
    """A file of the shared data folder next to the repository (or next to its worktrees folder), if present."""
    for base in ("..", os.path.join("..", "..")):
        path = os.path.normpath(os.path.join(ROOT, base, "shared", "data", name))
        if os.path.exists(path):
            return path
    return None


CHINESE = [
    "分词器把文本切成一个个词元，模型再根据词元预测下一个词元。",
    "字节级的分词器先把文本编码成 UTF-8 字节，所以不会出现未登录词。",
    "压缩率越高，同样长度的上下文就能容纳越多的文字，训练和推理也就越快。",
    "我们用一元语言模型给每个片段打分，再用维特比算法找出概率最大的切分。",
    "训练语料包括中文、英文和代码，数字单独成词可以让模型更好地学会算术。",
    "今天天气不错，我们去公园散步吧！明天可能会下雨，记得带伞。",
    "北京、上海、广州和深圳是中国人口最多的城市之一。",
    "这个函数返回一个列表，列表里的每个元素都是整数。",
]

TEXTS = {
    "chinese": "科学空间里有很多关于分词、语言模型和优化器的文章。\n天气不错，适合写代码。",
    "english": "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces.",
    "code": "def f(x: int) -> int:\n    return x ** 2 + 1  # square\n\nprint([f(i) for i in range(10)])\n",
    "digits": "In 2023, 12345 + 67890 = 80235; pi ~ 3.14159, ０１２３ and ٣٤٥ too.",
    "emoji": "emoji 😀👍🏽 flags 🇨🇳🇺🇸 and family 👨‍👩‍👧 done",
    "whitespace": "a  b   c\t\td \n\n\n  \r\n\r\n   \n\t end   ",
    "newlines_only": "\n\n\n\n",
    "special_strings": "<pad><bos> text <eos> more <unk> </s>",
    "combining": "e\u0301 vs \u00e9, A\u030a vs \u00c5, \u1100\u1161 hangul jamo",
    "mixed": "BytePiece 是一个 byte-level 的 Unigram 分词器（tokenizer），compression 更高！",
    "control": "nul\x00bell\x07 esc\x1b del\x7f nbsp\xa0 zwsp\u200b line\u2028para\u2029 nel\x85 ff\x0c vt\x0b",
    "repeats": "}}}}}} ====== ------ ...... !!!!!! ?????? 哈哈哈哈哈哈 ______",
    "empty": "",
}


def long_line() -> str:
    """A 3000-character single line mixing everything (no newline inside)."""
    rng = random.Random(0)
    parts = [t.replace("\n", " ") for t in TEXTS.values() if t.strip()] + CHINESE
    return " ".join(rng.choice(parts) for _ in range(120))[:3000]


def train_reference(docs: list[str], vocab_size: int, isolate_digits: bool, ensure_unicode: bool) -> dict:
    trainer = bytepiece.Trainer(
        order=6,
        max_vocab_size=vocab_size,
        max_piece_length=36,
        min_count=2,
        isolate_digits=isolate_digits,
        ensure_unicode=ensure_unicode,
    )
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
        trainer.train(docs, workers=1)
    return trainer.dump(trainer.pieces[0])


def main() -> None:
    docs = list(embedded_corpus(max_chars=30000)) + CHINESE * 15
    texts = {**TEXTS, "long_line": long_line()}
    golden = {"bytepiece_version": getattr(bytepiece, "__version__", "0.6.3"), "texts": texts, "models": {}}
    for isolate_digits in (False, True):
        for ensure_unicode in (False, True):
            name = f"id{int(isolate_digits)}_eu{int(ensure_unicode)}"
            model = train_reference(docs, 700, isolate_digits, ensure_unicode)
            tokenizer = bytepiece.Tokenizer(model)
            golden["models"][name] = {
                "isolate_digits": isolate_digits,
                "ensure_unicode": ensure_unicode,
                "model": model,
                "ids": {key: tokenizer.encode(text) for key, text in texts.items()},
            }
    model_40k = shared_data("bytepiece.plus.40k.model")
    if model_40k:
        tokenizer = bytepiece.Tokenizer(model_40k)
        keys = ["chinese", "english", "code", "digits", "emoji", "whitespace", "repeats", "mixed"]
        golden["plus_40k_ids"] = {key: tokenizer.encode(texts[key]) for key in keys}
    with open(OUTPUT, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUTPUT} ({os.path.getsize(OUTPUT) / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
