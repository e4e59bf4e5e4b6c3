"""Viterbi sampling throughput: ours vs deterministic encodes and the reference bytepiece sampler.

Targets (issue 8): sampling (alpha = 0.1) >= 0.5x our deterministic encode and >= 1.0x the reference package's
``bytepiece.Tokenizer(model).encode(text, alpha=0.1)``, on the shared corpora with the shared 40k BytePiece model.
When the issue was written our deterministic encode was HF's Rust Unigram (``encode_batch``, kept as a column);
now it is the C segmenter (``tokenizer(texts)``), which also samples. The NumPy sampler (what runs without the C
extension, and for non-BytePiece Unigram tokenizers) is a column too. Texts are the corpus lines (newlines kept), the unit BytePiece itself
segments, and documents of >= 4 KB of consecutive lines (a typical training example); every method gets the same
list of texts.

    flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.sampling --reps 3 --warmup 1
"""

from __future__ import annotations

import os
import statistics

from benchmarks.bytepiece import without_c_segmenter
from benchmarks.harness import Report, bench_parser, time_fn
from hf_su.testing import shared_data_path
from hf_su.tokenization import bytepiece as bytepiece_module
from hf_su.tokenization.bytepiece import BytePieceTokenizerFast, encode_threads

MODEL = shared_data_path("bytepiece.plus.40k.model")
CORPORA = {"kexue_zh": shared_data_path("kexue_zh.txt"), "kexue_en": shared_data_path("kexue_en.txt")}


def documents(lines: list[str], size: int) -> list[str]:
    """Consecutive lines joined into texts of at least ``size`` characters (the last may be shorter)."""
    docs, current, length = [], [], 0
    for line in lines:
        current.append(line)
        length += len(line)
        if length >= size:
            docs.append("".join(current))
            current, length = [], 0
    return docs + (["".join(current)] if current else [])


def interleaved(fns, *, warmup: int, reps: int) -> list[float]:
    """Median seconds of each function, timed in alternating rounds so load changes hit all of them alike."""
    for fn in fns:
        time_fn(fn, warmup=warmup, reps=1)
    rounds = [[time_fn(fn, warmup=0, reps=1).median for fn in fns] for _ in range(reps)]
    return [statistics.median(column) for column in zip(*rounds)]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--max-mb", type=float, default=None, help="use at most this many MB of each corpus")
    args = parser.parse_args()
    import bytepiece

    from hf_su.tokenization.sampling import encode_sampled

    tokenizer = BytePieceTokenizerFast.from_bytepiece(MODEL)
    backend = tokenizer.backend_tokenizer
    reference = bytepiece.Tokenizer(MODEL)
    max_mb = 0.05 if args.quick else args.max_mb
    max_chars = -1 if max_mb is None else int(max_mb * 1e6)  # read(-1): the whole file
    report = Report(
        "Viterbi sampling throughput (alpha = 0.1), 40k BytePiece model"
        + ("" if bytepiece_module._viterbi is not None else " (C segmenter not built: ours = the NumPy sampler)"),
        columns=[
            "corpus",
            "texts",
            "MB",
            "ours MB/s",
            "our encode MB/s",
            "HF encode MB/s",
            "NumPy sampler MB/s",
            "bytepiece sample MB/s",
            "vs our encode",
            "vs HF",
            "vs bytepiece",
        ],
    )
    for name, path in CORPORA.items():
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read(max_chars).splitlines(keepends=True)
        for unit, texts in (("lines", lines), ("4 KB docs", documents(lines, 4096))):
            mb = sum(len(text.encode()) for text in texts) / 1e6
            encode_sampled(tokenizer, texts[:10], alpha=0.1, seed=0)  # compile the vocabulary outside the timing

            def ours(texts=texts):
                return encode_sampled(tokenizer, texts, alpha=0.1, seed=0)

            def encode(texts=texts):
                return tokenizer(texts)["input_ids"]

            def hf(texts=texts):
                return backend.encode_batch(texts, add_special_tokens=False)

            def numpy_sampler(texts=texts):
                return without_c_segmenter(bytepiece_module, lambda: encode_sampled(tokenizer, texts, 0.1, seed=0))

            def ref(texts=texts):
                return [reference.encode(text, alpha=0.1) for text in texts]

            numpy_sampler()  # compile the NumPy sampler's vocabulary outside the timing
            t_ours, t_encode, t_hf, t_numpy, t_ref = interleaved(
                (ours, encode, hf, numpy_sampler, ref), warmup=args.warmup, reps=args.reps
            )
            report.add(
                corpus=name,
                texts=f"{len(texts)} {unit}",
                MB=mb,
                **{
                    "ours MB/s": mb / t_ours,
                    "our encode MB/s": mb / t_encode,
                    "HF encode MB/s": mb / t_hf,
                    "NumPy sampler MB/s": mb / t_numpy,
                    "bytepiece sample MB/s": mb / t_ref,
                    "vs our encode": t_encode / t_ours,
                    "vs HF": t_hf / t_ours,
                    "vs bytepiece": t_ref / t_ours,
                },
            )
    report.notes.append(
        "Throughput = corpus bytes / median wall time over rounds that alternate the methods; ratios are ours / "
        "baseline throughput (targets: vs our encode >= 0.5, vs bytepiece >= 1.0). Ours, our encode and HF "
        f"encode_batch use {encode_threads()} threads; the NumPy sampler and bytepiece use one. "
        "Shared machine: other jobs ran at the same time; ratios come from one run."
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
