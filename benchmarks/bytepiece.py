"""BytePiece: encode throughput vs the reference package, train_bytepiece vs the reference Trainer, compression table.

Needs the reference ``bytepiece`` package and the shared data folder (bytepiece.plus.40k.model, kexue_zh.txt,
kexue_en.txt; found next to the repository or via --data-dir). Parts (each fits in about five minutes):

    python -m benchmarks.bytepiece --part encode --reps 3
    python -m benchmarks.bytepiece --part train            # 5 MB, vocab sizes 10k/20k/40k

Encode: ids are checked equal to the reference before timing. "one text" encodes a whole corpus file as one string;
"batch" encodes its paragraphs (split on blank lines) in one call (ours: the C segmenter on all cores, or the
backend Unigram model when it is not built, see the table's title; the reference has no batch API, so it loops). Train: both trainers use all cores (ours: workers=None; reference:
workers=os.cpu_count()). The reference runs Trainer.train's own steps, counting once and pruning each size from a
fresh copy of the counts (a single-size run's time = counting + that size's pruning); the model files of both are
compared byte for byte. Compression is bytes per token on held-out paragraphs (every 10th paragraph of each corpus,
never trained on).
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

from benchmarks.harness import REPO_ROOT, Report, bench_parser, time_fn

DATA_FILES = ("bytepiece.plus.40k.model", "kexue_zh.txt", "kexue_en.txt")


def find_data_dir(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [os.path.join(REPO_ROOT, b, "shared", "data") for b in ("..", "../..")]
    for path in candidates:
        if path and all(os.path.exists(os.path.join(path, f)) for f in DATA_FILES):
            return os.path.normpath(path)
    sys.exit(f"shared data folder with {DATA_FILES} not found (tried {candidates}); pass --data-dir")


def read(data_dir: str, name: str) -> str:
    with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        return f.read()


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def mb(texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def interleaved(run_a, run_b, args) -> tuple[float, float]:
    """Median seconds of ``run_a`` and ``run_b`` timed in alternation, so load from other jobs hits both alike."""
    for _ in range(args.warmup):
        run_a(), run_b()
    a, b = [], []
    for _ in range(args.reps):
        a.append(time_fn(run_a, warmup=0, reps=1, sync=False).median)
        b.append(time_fn(run_b, warmup=0, reps=1, sync=False).median)
    return statistics.median(a), statistics.median(b)


def without_c_segmenter(module, run):
    """Run ``run`` with hf_su's BytePiece encode falling back to the tokenizers backend."""
    saved, module._viterbi = module._viterbi, None
    try:
        return run()
    finally:
        module._viterbi = saved


def bench_encode(args, data_dir: str) -> None:
    import bytepiece

    from hf_su.tokenization import bytepiece as bytepiece_module
    from hf_su.tokenization.bytepiece import BytePieceTokenizerFast, encode_threads

    model = os.path.join(data_dir, "bytepiece.plus.40k.model")
    ours, ref = BytePieceTokenizerFast.from_bytepiece(model), bytepiece.Tokenizer(model)
    segmenter = "C segmenter" if bytepiece_module._viterbi is not None else "tokenizers Unigram (C segmenter not built)"
    report = Report(
        f"BytePiece encode throughput (bytepiece.plus.40k model; ours: {segmenter}, {encode_threads()} threads)",
        columns=["corpus", "mode", "MB", "ours MB/s", "reference MB/s", "ratio", "target"],
    )
    for name in ("kexue_zh.txt", "kexue_en.txt"):
        text = read(data_dir, name)
        if args.quick:
            text = text[:200_000]
        docs = paragraphs(text)
        if ours.encode(text) != ref.encode(text) or ours(docs)["input_ids"] != [ref.encode(d) for d in docs]:
            sys.exit(f"ids differ from the reference on {name}")
        cases = [
            ("one text", [text], lambda t=text: ours.encode(t), lambda t=text: ref.encode(t), ">= 1.0"),
            ("batch", docs, lambda d=docs: ours(d)["input_ids"], lambda d=docs: [ref.encode(x) for x in d], ">= 1.7"),
        ]
        if bytepiece_module._viterbi is not None:  # what users without a C compiler get
            cases.append(
                (
                    "batch, no C segmenter",
                    docs,
                    lambda d=docs: without_c_segmenter(bytepiece_module, lambda: ours(d)["input_ids"]),
                    lambda d=docs: [ref.encode(x) for x in d],
                    "report",
                )
            )
        for mode, texts, run_ours, run_ref, target in cases:
            t_ours, t_ref = interleaved(run_ours, run_ref, args)
            size = mb(texts)
            report.add(
                corpus=name,
                mode=mode,
                MB=size,
                **{
                    "ours MB/s": size / t_ours,
                    "reference MB/s": size / t_ref,
                    "ratio": t_ref / t_ours,
                    "target": target,
                },
            )
    report.notes.append(
        f"ratio = reference time / ours (higher is better); median of {args.reps} alternating runs after "
        f"{args.warmup} warm-up; "
        f"{os.cpu_count()} CPU cores, shared with other jobs. Ids verified identical to the reference."
    )
    report.emit(args.json)


def train_split(data_dir: str, train_mb: float) -> tuple[list[str], list[str], list[str]]:
    """Interleaved zh/en paragraphs: every 10th held out; training docs are the first ``train_mb`` MB of the rest."""
    zh, en = paragraphs(read(data_dir, "kexue_zh.txt")), paragraphs(read(data_dir, "kexue_en.txt"))
    held_zh, held_en = zh[9::10], en[9::10]
    rest = [p for i, p in enumerate(zh) if i % 10 != 9], [p for i, p in enumerate(en) if i % 10 != 9]
    mixed = [p for pair in zip(*rest) for p in pair] + rest[0][len(rest[1]) :] + rest[1][len(rest[0]) :]
    train, size = [], 0
    for p in mixed:
        if size >= train_mb * 1e6:
            break
        train.append(p)
        size += len(p.encode())
    return train, held_zh, held_en


def hf_bpe(train: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(train, trainer)
    return tok


def hf_unigram(train: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(train, trainer)
    return tok


def bytes_per_token(encode, texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / sum(len(encode(t)) for t in texts)


def reference_models(bytepiece, train: list[str], sizes: list[int]) -> tuple[dict, dict]:
    """The reference Trainer at each size, with ``Trainer.train``'s own steps: count once, prune per size.

    ``Trainer.train(workers>1)`` is count n-grams -> prune n-grams -> count pieces -> prune pieces; the counts do not
    depend on the vocabulary size, so they are computed once and each size is pruned from a fresh copy (exactly
    what a separate single-size run does). Returns the piece counts per size and the seconds a single-size run takes.
    """
    workers = os.cpu_count() or 1
    trainer = bytepiece.Trainer(
        order=6, max_vocab_size=sizes[-1], max_piece_length=36, min_count=2, ensure_unicode=False
    )
    times, models = {}, {}
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
        start = time.perf_counter()
        trainer.ngrams = trainer.prune_ngrams(trainer.pcount_ngrams(trainer.norm(train), workers, 1000))
        counted = trainer.pcount_pieces(trainer.norm(train), workers, 1000)
        times["count"] = time.perf_counter() - start
        for size in sizes:
            trainer.max_vocab_size = [size]
            start = time.perf_counter()
            models[size] = trainer.prune_pieces(dict(counted), workers, 1000)[0]
            times[size] = times["count"] + time.perf_counter() - start
    return models, times


def bench_train(args, data_dir: str) -> None:
    import bytepiece

    from hf_su.tokenization.bytepiece import BytePieceTokenizerFast, write_bytepiece_model
    from hf_su.tokenization.train import train_bytepiece

    sizes = sorted(int(s) for s in args.vocab_sizes.split(","))
    train_mb = 0.3 if args.quick else args.train_mb
    train, held_zh, held_en = train_split(data_dir, train_mb)
    workdir = tempfile.mkdtemp(prefix="bytepiece_bench_")
    ours_paths, ours_times = {}, {}
    for size in sizes:
        start = time.perf_counter()
        ours_paths[size] = train_bytepiece(train, size, os.path.join(workdir, f"ours.{size}"), progress=False)
        ours_times[size] = time.perf_counter() - start
    ref_models, ref_times = reference_models(bytepiece, train, sizes)

    timing = Report(
        f"train_bytepiece vs bytepiece.Trainer ({mb(train):.2f} MB, order 6, min_count 2, all cores)",
        columns=["vocab", "ours s", "reference s", "speed-up", "target", "same model file", "trained vocab"],
    )
    for size in sizes:
        ref_path = write_bytepiece_model(ref_models[size], os.path.join(workdir, f"ref.{size}"))
        with open(ref_path, "rb") as a, open(ours_paths[size], "rb") as b:
            identical = a.read() == b.read()
        timing.add(
            vocab=size,
            **{
                "ours s": ours_times[size],
                "reference s": ref_times[size],
                "speed-up": ref_times[size] / ours_times[size],
                "target": ">= 3",
                "same model file": "yes" if identical else "NO",
                "trained vocab": len(ref_models[size]) + 3,
            },
        )
    timing.notes.append(
        "reference s = its shared counting steps (n-grams + pieces, "
        f"{ref_times['count']:.1f} s) + its pruning for that size, i.e. what Trainer(max_vocab_size=size).train() "
        "runs; a corpus this small yields fewer pieces than the larger sizes allow. Shared machine."
    )
    timing.emit(args.json and args.json.replace(".json", ".train.json"))

    table = Report(
        "Compression on held-out paragraphs (bytes/token, higher is better)",
        columns=["vocab", "corpus", "ours", "reference", "HF BPE (byte-level)", "HF Unigram (Metaspace)"],
    )
    ref_tokenizer = bytepiece.Tokenizer
    for size in sizes:
        ours_tok = BytePieceTokenizerFast.from_bytepiece(ours_paths[size])
        ref_tok = ref_tokenizer(bytepiece.Trainer().dump(ref_models[size]))
        bpe = hf_bpe(train, size)
        try:
            unigram = hf_unigram(train, size)
        except Exception as err:  # e.g. fewer ids than distinct characters: HF Unigram cannot train then
            unigram, unigram_error = None, str(err)
        for corpus, held in (("zh", held_zh), ("en", held_en)):
            table.add(
                vocab=size,
                corpus=corpus,
                ours=bytes_per_token(ours_tok.encode, held),
                reference=bytes_per_token(ref_tok.encode, held),
                **{
                    "HF BPE (byte-level)": bytes_per_token(lambda t, m=bpe: m.encode(t).ids, held),
                    "HF Unigram (Metaspace)": "n/a"
                    if unigram is None
                    else bytes_per_token(lambda t, m=unigram: m.encode(t).ids, held),
                },
            )
        if unigram is None:
            table.notes.append(f"HF Unigram at {size}: {unigram_error}")
    table.notes.append(
        f"All four trained on the same {mb(train):.2f} MB (zh+en paragraphs), evaluated on {mb(held_zh):.2f} MB zh "
        f"and {mb(held_en):.2f} MB en held out. HF Unigram maps unseen characters to <unk> (counted as tokens)."
    )
    table.emit(args.json and args.json.replace(".json", ".compression.json"))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--part", choices=("encode", "train", "all"), default="all")
    parser.add_argument("--data-dir", help="folder with bytepiece.plus.40k.model, kexue_zh.txt, kexue_en.txt")
    parser.add_argument("--train-mb", type=float, default=5.0, help="training corpus size (MB of UTF-8)")
    parser.add_argument("--vocab-sizes", default="10000,20000,40000", help="comma-separated vocabulary sizes")
    args = parser.parse_args()
    data_dir = find_data_dir(args.data_dir)
    if args.part in ("encode", "all"):
        bench_encode(args, data_dir)
    if args.part in ("train", "all"):
        bench_train(args, data_dir)


if __name__ == "__main__":
    main()
