"""Token healing (issue 10): byte tables for three tokenizer families, back-off, exact renormalised constraint, batching.

Tokenizers are built locally with `tokenizers` from hand-written vocabularies, so each token's bytes are known
independently of the code under test. A tiny Llama is trained here (a few hundred full-batch steps on a dozen
sentences) to always see "首都" as one token and "首" only before "尔".
"""

from __future__ import annotations

import base64

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from hf_su.generation.healing import (
    HealingLogitsProcessor,
    TokenBytes,
    _Healing,
    back_off,
    generate_healed,
    token_bytes,
)
from hf_su.testing import tiny_causal_lm

# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers of the three families, with the bytes of every id known by construction


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-unicode table, written out independently of the module under test."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def bytepiece_recipe_tokenizer(pieces: list[str]) -> tuple[PreTrainedTokenizerFast, list[bytes | None]]:
    """A byte-level Unigram tokenizer in the DESIGN recipe (BytePiece ids: specials 0-2, the 256 bytes, then pieces)."""
    b2u = _byte_to_unicode()
    specials = ["<pad>", "<bos>", "<eos>"]
    units = [bytes([b]) for b in range(256)] + sorted({p.encode() for p in pieces}, key=lambda p: (len(p), p))
    vocab = [(s, -1e9) for s in specials] + [
        ("".join(b2u[b] for b in u), -10.0 if len(u) == 1 else -5.0) for u in units
    ]
    backend = Tokenizer(models.Unigram(vocab, unk_id=None))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r".*\n+|.+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )
    return tok, [None, None, None, *units]


def sentencepiece_style_tokenizer() -> tuple[PreTrainedTokenizerFast, list[bytes | None]]:
    """A Llama-2-style tokenizer: Unigram with ▁ word boundaries, <0xNN> byte fallback, BOS prepended."""
    words = ["▁The", "▁quick", "▁brown", "▁bro", "▁fox", "▁Hello", "▁world", "▁wor", "ld", "▁北京", "▁is", "▁big"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["T", "H", "▁", ".", ","]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = (
        [(s, 0.0) for s in specials]
        + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
        + [(p, -8.0) for p in letters]
        + [(w, -4.0) for w in words]
    )
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    expected = [None, None, None, *(bytes([b]) for b in range(256))]
    expected += [p.replace("▁", " ").encode() for p in letters + words]
    return tok, expected


ZH_PIECES = ["北京", "东京", "巴黎", "伦敦", "首", "尔", "是", "中国", "日本", "法国", "英国", "韩国", "的", "首都"]
ZH_PIECES += ["。", "我们", "去", "首都机场", "机", "场", "很", "大"]
ZH_SENTENCES = [
    "北京是中国的首都。",
    "东京是日本的首都。",
    "巴黎是法国的首都。",
    "伦敦是英国的首都。",
    "首尔是韩国的首都。",
    "我们去首尔。",
    "我们去北京。",
    "我们去东京。",
    "北京首都机场很大。",
]


@pytest.fixture(scope="module")
def zh():
    """(tokenizer, bytes of each id, a tiny float64 Llama trained on ZH_SENTENCES)."""
    tok, expected = bytepiece_recipe_tokenizer(ZH_PIECES)
    rows = [r + [tok.eos_token_id] for r in tok(ZH_SENTENCES)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=len(tok)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention on a shared machine
    try:
        for _ in range(150):
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.6, f"tiny model did not fit the corpus (loss {loss.item():.3f})"
    return tok, expected, model.double().eval()


@pytest.fixture(scope="module")
def sentencepiece():
    tok, expected = sentencepiece_style_tokenizer()
    return tok, expected, tiny_causal_lm("llama", vocab_size=len(tok), dtype=torch.float64)


@pytest.fixture(scope="module")
def byte_level_bpe(tokenizer):
    return tokenizer, None, tiny_causal_lm("llama", vocab_size=len(tokenizer), dtype=torch.float64)


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def _trimmed(tok, prompt: str, max_backoff_tokens: int = 2) -> tuple[list[int], bytes]:
    ids = tok(prompt)["input_ids"]
    table = token_bytes(tok)
    k = back_off(table, ids, max_backoff_tokens)
    return ids[: len(ids) - k], b"".join(table.pieces[i] for i in ids[len(ids) - k :])


def _naive_consistent(pieces: list[bytes | None], removed: bytes, vocab_size: int) -> torch.Tensor:
    """Tokens whose bytes extend the removed bytes or are a prefix of them (all bytes present: no dead ends)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, p in enumerate(pieces):
        mask[i] = bool(p) and (p.startswith(removed) or removed.startswith(p))
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Byte tables


@pytest.mark.parametrize("family", ["bytepiece", "sentencepiece"])
def test_byte_table_matches_construction(family, zh, sentencepiece):
    tok, expected, _ = zh if family == "bytepiece" else sentencepiece
    table = token_bytes(tok)
    assert table.pieces == expected
    assert token_bytes(tok) is table  # cached


@pytest.mark.parametrize("family", ["bytepiece", "sentencepiece", "byte_level_bpe"])
def test_byte_table_round_trips_encodings(family, zh, sentencepiece, byte_level_bpe):
    tok = {"bytepiece": zh, "sentencepiece": sentencepiece, "byte_level_bpe": byte_level_bpe}[family][0]
    table = token_bytes(tok)
    for text in ["北京是中国的首都。", "The quick brown fox", "Hello  world,\n\n tabs\tand é😀 日本", "x"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expected = (" " + text if family == "sentencepiece" else text).encode()
        assert b"".join(table.pieces[i] for i in ids) == expected
    if family == "byte_level_bpe":  # tokens that are whole UTF-8 text decode to their bytes
        for i, piece in enumerate(table.pieces):
            text = tok.decode([i])
            if piece is not None and "\ufffd" not in text:
                assert piece == text.encode(), i
        assert all(table.pieces[i] is None for i in tok.all_special_ids)


def test_bytepiece_adapter_table():
    """hf_su's own BytePieceTokenizerFast (DESIGN recipe, another module) gets the model file's bytes for each id."""
    bytepiece = pytest.importorskip("hf_su.tokenization.bytepiece")
    _, expected = bytepiece_recipe_tokenizer(ZH_PIECES)
    units = expected[3:]
    model_file = {
        base64.b64encode(u).decode(): [3 + i, u.decode(errors="ignore"), 1000 if len(u) > 1 else 1]
        for i, u in enumerate(units)
    }
    tok = bytepiece.BytePieceTokenizerFast.from_bytepiece(model_file)
    table = token_bytes(tok)
    assert table.family == "byte_level" and table.pieces[3:] == units
    assert all(table.pieces[i] is None for i in tok.all_special_ids)
    assert back_off(table, tok("北京首都机")["input_ids"], 2) == 2


def test_added_tokens_and_rebuild():
    tok, _ = sentencepiece_style_tokenizer()
    before = token_bytes(tok)
    tok.add_tokens(["<think>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    after = token_bytes(tok)
    assert after is not before and len(after) == len(tok)
    assert after.pieces[tok.convert_tokens_to_ids("<think>")] == b"<think>"
    assert after.pieces[tok.convert_tokens_to_ids("<|im_end|>")] is None


def test_prefix_index_queries():
    table = TokenBytes(pieces=[None, b"a", b"ab", b"abc", b"abd", b"b", b"\xff", b"\xff\xff", b"ab"], family="test")
    assert sorted(table.extensions(b"ab").tolist()) == [2, 3, 4, 8]
    assert sorted(table.extensions(b"\xff").tolist()) == [6, 7]
    assert table.extensions(b"abcd").tolist() == []
    assert table.has_longer_extension(b"ab") and not table.has_longer_extension(b"abc")
    assert table.exact(b"ab") == [2, 8]


def test_dead_ends_are_excluded():
    # "a" and "ab" are prefixes of the removed "abc" but nothing spells the rest ("bc" / "c"): only "abcd" completes
    table = TokenBytes(pieces=[b"a", b"ab", b"abcd", b"x", b"bc"], family="test")
    healing = _Healing(table, b"abc")
    assert sorted(healing.allowed(0, torch.device("cpu")).tolist()) == [0, 2]  # "a" then "bc" is a complete path
    table = TokenBytes(pieces=[b"a", b"ab", b"abcd", b"x"], family="test")
    assert _Healing(table, b"abc").allowed(0, torch.device("cpu")).tolist() == [2]


# ---------------------------------------------------------------------------------------------------------------------
# Back-off


def test_back_off_amounts(zh):
    tok, _, _ = zh
    table = token_bytes(tok)
    cases = {"北京是中国的首": 1, "北京首都机": 2, "我们去首尔。": 0, "东京是日本的": 0}
    for prompt, k in cases.items():
        assert back_off(table, tok(prompt)["input_ids"], 2) == k, prompt
    # "北京首都机": "机" alone extends nothing, "首都机" is a prefix of "首都机场": the deepest useful k is taken
    assert back_off(table, tok("北京首都机")["input_ids"], 1) == 0
    assert back_off(table, tok("北京是中国的首")["input_ids"], 0) == 0
    # a single-token prompt keeps its token; special tokens are never removed
    assert back_off(table, tok("首")["input_ids"], 2) == 0
    shou = tok.convert_tokens_to_ids(tok.tokenize("首")[0])
    assert back_off(table, [tok.bos_token_id, shou], 2) == 1
    assert back_off(table, [shou, tok.bos_token_id, shou], 2) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Healing end to end


def test_healing_restores_the_natural_token(zh):
    tok, _, model = zh
    prompt = "北京是中国的首"
    shou, shoudu = (tok.convert_tokens_to_ids(tok.tokenize(t)[0]) for t in ("首", "首都"))
    inputs = tok([prompt], return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    plain_new = plain[0, inputs["input_ids"].shape[1] :].tolist()
    # unhealed: the prompt ends in the unnatural split 首|..., which the model only saw before 尔
    assert inputs["input_ids"][0, -1].item() == shou and shoudu not in plain_new
    assert _decode(tok, plain[0]).startswith(prompt + "尔")

    healed = generate_healed(model, tok, [prompt], max_new_tokens=3, do_sample=False)
    trimmed, removed = _trimmed(tok, prompt)
    assert removed == "首".encode()
    assert healed[0, : len(trimmed)].tolist() == trimmed and healed[0, len(trimmed)].item() == shoudu
    assert _decode(tok, healed[0]) == "北京是中国的首都。"


def _check_first_step_distribution(tok, pieces, model, prompt):
    trimmed, removed = _trimmed(tok, prompt)
    assert removed, f"{prompt!r} should be backed off"
    ids = torch.tensor([trimmed])
    with torch.no_grad():
        logits = model(ids).logits[0, -1].double()
    consistent = _naive_consistent(pieces, removed, logits.shape[-1])
    p = logits.softmax(-1) * consistent
    expected = p / p.sum()

    processor = HealingLogitsProcessor(tok, [removed], prompt_length=len(trimmed))
    ours = processor(ids, logits[None].clone())[0].softmax(-1)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)

    out = generate_healed(
        model, tok, [prompt], max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    torch.testing.assert_close(out.scores[0][0].double().softmax(-1), expected, rtol=1e-5, atol=1e-6)
    assert consistent[out.sequences[0, -1]]


def test_first_step_is_the_restricted_renormalised_distribution(zh):
    tok, pieces, model = zh
    for prompt in ["北京是中国的首", "北京首都机"]:
        _check_first_step_distribution(tok, pieces, model, prompt)


@pytest.mark.parametrize("family", ["sentencepiece", "byte_level_bpe"])
def test_other_families_heal_exactly(family, sentencepiece, byte_level_bpe):
    tok, expected, model = {"sentencepiece": sentencepiece, "byte_level_bpe": byte_level_bpe}[family]
    pieces = token_bytes(tok).pieces if expected is None else expected
    prompts = ["The quick bro", "Hello wor", "北京 is big"] if family == "sentencepiece" else ["The quick bro", "Hel"]
    _check_first_step_distribution(tok, pieces, model, prompts[0])
    for kwargs in (dict(do_sample=False), dict(do_sample=True, num_return_sequences=3, top_k=0)):
        out = generate_healed(model, tok, prompts, max_new_tokens=6, **kwargs)
        copies = kwargs.get("num_return_sequences", 1)
        for i, seq in enumerate(out):
            assert _decode(tok, seq).startswith(prompts[i // copies])


def test_batch_with_left_padding_equals_single_prompts(zh):
    tok, _, model = zh
    prompts = ["北京是中国的首", "北京首都机", "我们去首尔。", "东京是日本的", "我们去首"]
    batch = generate_healed(model, tok, prompts, max_new_tokens=5, do_sample=False)
    assert batch.shape[0] == len(prompts) and (batch[:, 0] == tok.pad_token_id).any()  # rows were padded
    for prompt, row in zip(prompts, batch):
        single = generate_healed(model, tok, prompt, max_new_tokens=5, do_sample=False)
        assert _decode(tok, row) == _decode(tok, single[0])
        assert _decode(tok, row).startswith(prompt)
    assert _decode(tok, batch[1]).startswith("北京首都机场")


def test_sampling_beams_and_id_prompts(zh):
    tok, pieces, model = zh
    prompts = ["北京是中国的首", "北京首都机"]
    torch.manual_seed(1)
    sampled = generate_healed(model, tok, prompts, max_new_tokens=4, do_sample=True, num_return_sequences=4)
    assert sampled.shape[0] == 8
    for i, seq in enumerate(sampled):
        assert _decode(tok, seq).startswith(prompts[i // 4])
    beams = generate_healed(model, tok, prompts, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    for i, seq in enumerate(beams):
        assert _decode(tok, seq).startswith(prompts[i // 2])
    # the same prompts as a left-padded id tensor with its attention mask
    enc = tok(prompts, return_tensors="pt", padding=True)
    from_ids = generate_healed(model, tok, enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=4)
    from_text = generate_healed(model, tok, prompts, max_new_tokens=4)
    assert torch.equal(from_ids, from_text)
    # assisted decoding checks candidate tokens through the processor at several lengths per call
    prompt = "北京是中国的首都。东京是日本的首都。北京是中国的首"
    greedy = generate_healed(model, tok, prompt, max_new_tokens=6)
    assert torch.equal(generate_healed(model, tok, prompt, max_new_tokens=6, prompt_lookup_num_tokens=3), greedy)
    assert _decode(tok, greedy[0]).startswith(prompt + "都")


def test_no_backoff_is_plain_generate(zh):
    tok, _, model = zh
    inputs = tok(["北京是中国的首"], return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generate_healed(model, tok, "北京是中国的首", max_backoff_tokens=0, max_new_tokens=4), plain)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append([])


def test_streamers_see_the_prompt_then_only_new_text(zh):
    tok, _, model = zh
    prompt = "北京是中国的首"
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = generate_healed(model, tok, prompt, max_new_tokens=3, do_sample=False, streamer=streamer)
    full = _decode(tok, out[0])
    assert "".join(streamer) == full[len(prompt) :] == "都。"

    collect = _Collect()
    generate_healed(model, tok, prompt, max_new_tokens=3, do_sample=False, streamer=collect)
    assert collect.chunks[0] == tok(prompt)["input_ids"] and collect.chunks[-1] == []
    assert _decode(tok, sum(collect.chunks, [])) == full


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_clear_errors(zh, sentencepiece):
    tok, _, model = zh
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_healed(model, tok, [])
    with pytest.raises(ValueError, match="no tokens"):
        generate_healed(model, tok, [""])
    with pytest.raises(ValueError, match="max_backoff_tokens"):
        generate_healed(model, tok, ["北京"], max_backoff_tokens=-1)
    with pytest.raises(ValueError, match="positionally"):
        generate_healed(model, tok, ["北京"], input_ids=torch.tensor([[3]]))
    with pytest.raises(TypeError, match="prompts must be"):
        generate_healed(model, tok, ["北京", 3])
    with pytest.raises(TypeError, match="fast tokenizer"):
        token_bytes(object())
    with pytest.raises(ValueError, match="one sequence"):
        generate_healed(model, tok, ["北京是中国的首", "北京首都机"], streamer=_Collect())

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="cannot derive the bytes"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=wordpiece))

    trimmed, removed = _trimmed(tok, "北京是中国的首")
    processor = HealingLogitsProcessor(tok, [removed], prompt_length=len(trimmed))
    scores = torch.full((1, len(tok)), float("-inf"))
    scores[0, tok.convert_tokens_to_ids(tok.tokenize("是")[0])] = 0.0  # only an inconsistent token left
    with pytest.raises(ValueError, match="no token consistent"):
        processor(torch.tensor([trimmed]), scores)
    with pytest.raises(ValueError, match="fewer than prompt_length"):
        processor(torch.tensor([trimmed[:-1]]), scores)
