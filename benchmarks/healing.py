"""Overhead of ``generate_healed`` over plain ``generate`` (issue 10): 32 new tokens, a 40k-vocab tokenizer.

The tokenizer is BytePiece's released 40k model (shared/data/bytepiece.plus.40k.model beside the checkout) loaded
with hf_su's BytePieceTokenizerFast (byte-level Unigram); the models are tiny randomly initialised Llamas with that vocabulary, so the forward pass
is cheap and any per-step cost of healing shows. Prompts are lines of Su's blog cut at random characters, i.e. most
of them end inside a token and are healed. Both sides start from strings (tokenisation included) and generate
exactly 32 tokens, greedily. The one-time byte-table build is timed separately.

    flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.healing
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from benchmarks.harness import Report, bench_parser, time_fn
from hf_su.generation import healing
from hf_su.generation.healing import HealingLogitsProcessor, back_off, generate_healed, token_bytes
from hf_su.testing import shared_data_path, tiny_causal_lm
from hf_su.tokenization.bytepiece import BytePieceTokenizerFast


def cut_prompts(n: int, tok, seed: int = 0) -> list[str]:
    """``n`` Chinese lines from the corpus, each cut after a random character (20-60 characters kept) inside a token.

    Only prompts that get backed off are kept: every row pays for healing, the worst case for the overhead.
    """
    with open(shared_data_path("kexue_zh.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 80 and "http" not in line]
    rng, table, prompts = random.Random(seed), token_bytes(tok), []
    while len(prompts) < n:
        prompt = rng.choice(lines)[: rng.randint(20, 60)]
        if back_off(table, tok(prompt)["input_ids"], 2):
            prompts.append(prompt)
    return prompts


def interleaved_medians(fns, *, warmup: int, reps: int) -> list[float]:
    """Median seconds of each callable, timed in alternation so drifting machine load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            out.append(time_fn(fn, warmup=0, reps=1).median)
    return [statistics.median(t) for t in times]


def healing_work_seconds(model, run, reps: int) -> float:
    """Median seconds one ``run()`` of generate_healed spends on healing: outside ``model.generate`` (tokenising,
    back-off, padding) plus inside :class:`HealingLogitsProcessor` calls. Measured within each call, so machine load
    that slows the model does not blur it."""
    spent = {"generate": 0.0, "processor": 0.0}
    original_call = HealingLogitsProcessor.__call__
    original_generate = model.generate

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        return wrapper

    model.generate = timed("generate", original_generate)
    HealingLogitsProcessor.__call__ = timed("processor", original_call)
    try:
        samples = []
        for _ in range(reps):
            spent.update(generate=0.0, processor=0.0)
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start - spent["generate"] + spent["processor"])
    finally:
        del model.generate
        HealingLogitsProcessor.__call__ = original_call
    return statistics.median(samples)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new_tokens = 32
    tok = BytePieceTokenizerFast.from_bytepiece(shared_data_path("bytepiece.plus.40k.model"), padding_side="left")

    healing._TABLES.clear()
    start = time.perf_counter()
    table = token_bytes(tok)
    build_ms = (time.perf_counter() - start) * 1e3

    sizes = (
        [(1, dict()), (8, dict())]
        if args.quick
        else [(1, dict()), (8, dict()), (32, dict()), (8, dict(hidden_size=256))]
    )
    report = Report(
        f"generate_healed vs generate: {new_tokens} new tokens, vocab {len(tok)}",
        columns=[
            "case",
            "backed off",
            "generate ms",
            "healed ms",
            "overhead",
            "healing work ms",
            "work / generate",
            "target",
        ],
    )
    for batch, overrides in sizes:
        model = tiny_causal_lm("llama", vocab_size=len(tok), **overrides)
        prompts = cut_prompts(batch, tok, seed=batch)
        backed_off = [back_off(table, ids, 2) for ids in tok(prompts)["input_ids"]]
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def plain(prompts=prompts, model=model, kwargs=kwargs):
            with torch.no_grad():
                return model.generate(**tok(prompts, return_tensors="pt", padding=True), **kwargs)

        def healed(prompts=prompts, model=model, kwargs=kwargs):
            with torch.no_grad():
                return generate_healed(model, tok, prompts, **kwargs)

        base, ours = interleaved_medians([plain, healed], warmup=args.warmup, reps=args.reps)
        work = healing_work_seconds(model, healed, args.reps)
        hidden = overrides.get("hidden_size", 64)
        report.add(
            case=f"batch {batch}, hidden {hidden}",
            **{
                "backed off": f"{sum(k > 0 for k in backed_off)}/{batch} rows, {sum(backed_off)} tokens",
                "generate ms": base * 1e3,
                "healed ms": ours * 1e3,
                "overhead": f"{(ours / base - 1) * 100:+.1f}%",
                "healing work ms": work * 1e3,
                "work / generate": f"{work / base * 100:.1f}%",
                "target": "<= 10%",
            },
        )
    report.notes.append(
        f"One-time byte table build for the {len(tok)}-token vocabulary: {build_ms:.0f} ms (cached per tokenizer)."
    )
    report.notes.append(
        "Tiny Llama (2 layers, 4 heads); greedy; medians of runs alternating between the two; machine shared with "
        "other jobs, so the end-to-end overhead is noisy; 'healing work' is the time generate_healed spends outside "
        "model.generate plus inside the logits processor, measured within each call."
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
