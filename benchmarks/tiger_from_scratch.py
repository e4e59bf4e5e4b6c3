"""Tiger from scratch: held-out loss of a small llama trained on the embedded corpus with Tiger, Lion and AdamW.

Every case trains the same model (same initialisation, same batches, same warmup + cosine schedule and gradient
clipping at 1.0 as ``hf-su train``'s Trainer) with plain cross-entropy, and reports the held-out loss at a few steps.
Cases are ``name@lr`` with name one of:

* ``tiger``: our :class:`hf_su.Tiger` with :func:`hf_su.tiger_param_groups` (Su's rules: steps relative to each
  matrix's RMS / each embedding row's RMS, ``0.5 * lr`` for norm gains and biases, lazy embedding rows);
* ``tiger_abs``: our Tiger with the RMS scaling switched off (``lr_scale=1.0`` for every group, no lazy rows; weight
  decay on matrices and embeddings only), i.e. bare Lion with ``beta1 = beta2``;
* ``lion``: lucidrains' ``lion_pytorch.Lion`` with ``betas=(beta, beta)`` and the same groups as ``tiger_abs`` (an
  independent implementation: ``tiger_abs`` and ``lion`` must follow the same trajectory up to float rounding);
* ``adamw``: ``torch.optim.AdamW`` (Trainer's defaults: betas 0.9/0.999, eps 1e-8, decay on matrices/embeddings).

Options for the Tiger cases follow a comma: ``tiger@2e-2,beta=0.9`` (``beta``, ``min_rms``, ``shrink_ratio``).
The default run (tiny preset, five cases, ~5 minutes on one thread) checks that ``tiger_abs`` and ``lion`` agree and
compares Su's beta 0.965 with ``hf-su train``'s beta 0.9::

    flock /tmp/hf_su_bench.lock env PYTHONPATH=$PWD python -m benchmarks.tiger_from_scratch

The ``small`` preset (``hf-su train``'s default model) takes ~4 minutes per case on one thread, so run a few cases
at a time, e.g. ``--model small --cases adamw@1e-3 tiger@2e-2,beta=0.9``.

The tokenizer (BytePiece, ``--vocab-size`` pieces, trained on the training split as ``hf-su train`` does) and the
packed blocks are cached in ``--cache-dir``. One torch thread by default (``--threads``).
"""

from __future__ import annotations

import math
import os
import time

import torch

from benchmarks.harness import Report, bench_parser

NAMES = ("tiger", "tiger_abs", "lion", "adamw")


def load_blocks(cache_dir: str, vocab_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int, object]:
    """Train/eval token blocks of the embedded corpus with ``hf-su train``'s split and tokenizer (cached)."""
    from hf_su.pipeline import TrainSettings, _load_or_train_tokenizer, pack_blocks, read_documents, split_documents

    os.makedirs(cache_dir, exist_ok=True)
    settings = TrainSettings(vocab_size=vocab_size, seq_len=seq_len, progress=False)
    cache = os.path.join(cache_dir, f"blocks_v{vocab_size}_n{seq_len}.pt")
    train_docs, eval_docs = split_documents(read_documents(settings), settings.eval_fraction)
    tokenizer = _load_or_train_tokenizer(settings, train_docs, cache_dir)
    if not os.path.exists(cache):

        def blocks(docs: list[str]) -> torch.Tensor:
            streams = (tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs)
            return torch.tensor(pack_blocks(streams, seq_len, tokenizer.eos_token_id))

        torch.save({"train": blocks(train_docs), "eval": blocks(eval_docs)}, cache)
    data = torch.load(cache)
    return data["train"], data["eval"], len(tokenizer), tokenizer


def build_model(preset: str, vocab_size: int, seq_len: int, tokenizer, seed: int):
    from transformers import AutoModelForCausalLM

    from hf_su.pipeline import TrainSettings, _model_config

    config = _model_config(TrainSettings(model=preset, seq_len=seq_len), vocab_size, tokenizer)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _decay_split(model: torch.nn.Module) -> list[dict]:
    """Weight decay on tensors with two or more dims (matrices, the tied embedding), none on gains and biases."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, model: torch.nn.Module, lr: float, beta: float, weight_decay: float, options: dict):
    """The optimizer of a case; ``options`` (e.g. ``min_rms``, ``beta``) go to Tiger's constructor."""
    from hf_su.trainer.tiger import Tiger, tiger_param_groups

    if options and name not in ("tiger", "tiger_abs"):
        raise ValueError(f"options {options} apply to tiger cases only")
    if name == "tiger":
        groups = tiger_param_groups(model, weight_decay=weight_decay)
        return Tiger(groups, **{"lr": lr, "beta": beta, "weight_decay": weight_decay, **options})
    groups = _decay_split(model)
    if name == "tiger_abs":
        for g in groups:
            g.update(lr_scale=1.0, lazy=False)
        return Tiger(groups, **{"lr": lr, "beta": beta, "weight_decay": weight_decay, **options})
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, betas=(beta, beta), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {NAMES}")


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size]
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    model.train()
    return total / len(blocks)


def parse_case(case: str) -> tuple[str, float, dict[str, float]]:
    """``name@lr[,key=value...]`` -> (name, lr, Tiger options), e.g. ``tiger@1e-2,min_rms=0.05``."""
    head, *opts = case.split(",")
    name, _, lr = head.partition("@")
    options = {key: float(value) for key, _, value in (o.partition("=") for o in opts)}
    return name, float(lr), options


def train_case(case: str, data, args) -> dict:
    """Train one case; return the held-out loss at each of ``args.eval_at`` steps, max |weight| and minutes."""
    from transformers import get_cosine_schedule_with_warmup

    train, held, vocab, tokenizer = data
    model = build_model(args.model, vocab, args.seq_len, tokenizer, args.seed)
    name, lr, options = parse_case(case)
    opt = make_optimizer(name, model, lr, args.beta, args.weight_decay, options)
    schedule = get_cosine_schedule_with_warmup(opt, args.warmup_steps, args.steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    eval_at, losses = set(args.eval_at) | {args.steps}, {}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = order[(torch.arange(args.batch_size) + (step - 1) * args.batch_size) % len(train)]
        batch = train[idx]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step in eval_at:
            losses[step] = eval_loss(model, held, args.batch_size)
            if not math.isfinite(losses[step]):
                break
    weights = max(p.detach().abs().max().item() for p in model.parameters())
    return {"losses": losses, "max_abs_weight": weights, "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["adamw@1e-3", "lion@1e-3", "tiger_abs@1e-3", "tiger@1e-2", "tiger@2e-2,beta=0.9"],
        help="name@lr[,option=value...] with name one of " + ", ".join(NAMES),
    )
    parser.add_argument("--model", default="tiny", help="hf-su train model preset")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks scored at each evaluation")
    parser.add_argument("--beta", type=float, default=0.965, help="Tiger's beta (Lion gets betas=(beta, beta))")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="/tmp/hf_su_tiger_from_scratch")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.eval_at, args.eval_blocks = "tiny", 40, [20, 40], 8
    torch.set_num_threads(args.threads)
    train, held, vocab, tokenizer = load_blocks(args.cache_dir, args.vocab_size, args.seq_len)
    data = (train, held[: args.eval_blocks], vocab, tokenizer)
    steps = sorted(s for s in set(args.eval_at) | {args.steps} if s <= args.steps)
    report = Report(
        f"From-scratch llama ({args.model}, vocab {vocab}, {args.batch_size}x{args.seq_len} tokens/step, warmup "
        f"{args.warmup_steps} + cosine to {args.steps}, clip 1.0): held-out CE loss",
        columns=["optimizer", "lr", *[f"loss@{s}" for s in steps], "max |w|", "minutes"],
    )
    for case in args.cases:
        name, lr, options = parse_case(case)
        result = train_case(case, data, args)
        row = {f"loss@{s}": result["losses"].get(s, float("nan")) for s in steps}
        label = ", ".join([name, *(f"{k}={v:g}" for k, v in options.items())])
        report.add(optimizer=label, lr=lr, **row, **{"max |w|": result["max_abs_weight"]}, minutes=result["minutes"])
        print(f"{case}: {row} ({result['minutes']:.1f} min)", flush=True)
    report.notes.append(
        f"beta {args.beta}, weight decay {args.weight_decay}, seed {args.seed}, {len(train)} train / "
        f"{len(held[: args.eval_blocks])} held-out blocks; tiger lr is relative (x RMS), lion/tiger_abs/adamw absolute."
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
