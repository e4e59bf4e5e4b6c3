"""BytePiece: golden ids from the reference package, round trips, HF behaviour, clear errors, and the trainer.

The golden file (tests/data/bytepiece_golden.json, made by tests/data/make_bytepiece_golden.py) holds four tiny
models trained by the reference ``bytepiece.Trainer`` and the reference ``Tokenizer.encode`` ids of diverse texts, so
the core suite needs neither the reference package nor the shared data; tests that use them skip without them.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import random
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from hf_su.data import embedded_corpus
from hf_su.testing import shared_data_path, tiny_tokenizer
from hf_su.tokenization import bytepiece as bytepiece_module
from hf_su.tokenization.bytepiece import (
    BYTE_TO_CHAR,
    BytePieceTokenizerFast,
    bytepiece_chunks,
    json_float,
    load_tokenizer,
    read_bytepiece_model,
)
from hf_su.tokenization.train import train_bytepiece

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
with open(os.path.join(HERE, "data", "bytepiece_golden.json"), encoding="utf-8") as _f:
    GOLDEN = json.load(_f)
TEXTS: dict[str, str] = GOLDEN["texts"]
MODEL_NAMES = sorted(GOLDEN["models"])


try:
    import bytepiece as reference
except ImportError:  # the reference is optional (hard to install); golden ids cover the core suite
    reference = None
needs_reference = pytest.mark.skipif(reference is None, reason="reference bytepiece package not installed")


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, BytePieceTokenizerFast]:
    return {name: BytePieceTokenizerFast.from_bytepiece(GOLDEN["models"][name]["model"]) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def tok(tokenizers) -> BytePieceTokenizerFast:
    return tokenizers["id0_eu0"]


@pytest.fixture(scope="module")
def training_docs() -> list[str]:
    zh = [t for t in TEXTS.values() if any("\u4e00" <= c <= "\u9fff" for c in t)]
    return list(embedded_corpus(max_chars=20000)) + zh * 5


def _write_model(tmp_path, model: dict, name: str = "m.model") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(model), encoding="utf-8")
    return str(path)


# --- conformance ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_golden_ids(tokenizers, name, bytepiece_segmenter):
    tok, golden = tokenizers[name], GOLDEN["models"][name]["ids"]
    keys = list(golden)
    texts = [TEXTS[k] for k in keys]
    batch = tok(texts)["input_ids"]  # fast path, all texts in one parallel call
    full = tok(texts, return_offsets_mapping=True)["input_ids"]  # the full tokenizers pipeline
    for key, fast_ids, full_ids in zip(keys, batch, full):
        assert fast_ids == golden[key], key
        assert full_ids == golden[key], key
        assert tok.encode(TEXTS[key]) == golden[key], key


def test_golden_ids_released_40k_model(bytepiece_segmenter):
    path = shared_data_path("bytepiece.plus.40k.model")
    if path is None or "plus_40k_ids" not in GOLDEN:
        pytest.skip("shared data folder with bytepiece.plus.40k.model not found")
    tok = BytePieceTokenizerFast.from_bytepiece(path)
    keys = list(GOLDEN["plus_40k_ids"])
    for key in keys:
        assert tok.encode(TEXTS[key]) == GOLDEN["plus_40k_ids"][key], key
    assert tok([TEXTS[k] for k in keys])["input_ids"] == [GOLDEN["plus_40k_ids"][k] for k in keys]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab}= .\n\t\r中文的字😀é\u03010123456789١٢" + "".join(TEXTS["mixed"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@needs_reference
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_matches_installed_reference(tokenizers, name, bytepiece_segmenter):
    ref = reference.Tokenizer(GOLDEN["models"][name]["model"])
    texts = _random_texts(300, seed=len(name)) + list(TEXTS.values())
    assert tokenizers[name](texts)["input_ids"] == [ref.encode(t) for t in texts]


@needs_reference
def test_chunks_match_reference_normalize():
    for text in [*TEXTS.values(), *_random_texts(100)]:
        assert bytepiece_chunks(text) == reference.bytepiece.normalize(text)


def test_chunks_are_lines_of_nfc_text():
    for text in TEXTS.values():
        chunks = bytepiece_chunks(text)
        assert b"".join(chunks) == unicodedata.normalize("NFC", text).encode()
        for chunk in chunks[:-1]:
            assert chunk.endswith(b"\n") and b"\n" not in chunk.rstrip(b"\n")


def test_vocab_helper_gives_reference_scores(tok):
    model = GOLDEN["models"]["id0_eu0"]["model"]
    counts = {base64.b64decode(k): v[2] for k, v in model.items()}
    total = sum(counts.values())
    vocab = tok.bytepiece_vocab()
    assert vocab.first_id == 3 and vocab.vocab_size == len(model) + 3 == len(tok)
    for piece, token_id in vocab.piece_to_id.items():
        assert model[base64.b64encode(piece).decode()][0] == token_id
        assert vocab.pieces[token_id - 3] == piece
        assert vocab.log_probs[token_id - 3] == np.log(counts[piece]) - np.log(total)  # bit-exact


# --- decoding and round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_decode_round_trip_is_nfc(tokenizers, name):
    tok = tokenizers[name]
    for text in [*TEXTS.values(), *_random_texts(50)]:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_decode_of_invalid_utf8(tok):
    ids = tok.encode("中文")
    byte_ids = [tok.bytepiece_vocab().piece_to_id[bytes([b])] for b in "中".encode()]
    partial = byte_ids[:2]  # the first two bytes of a three-byte character
    assert tok.decode(partial) == "\ufffd"  # like bytes.decode(errors="replace")
    assert tok.decode_bytes(partial) == "中".encode()[:2]
    assert tok.decode_bytes(ids + partial).decode(errors="ignore") == "中文"  # the reference's decode
    assert tok.decode_bytes([1, *ids, 2], skip_special_tokens=False) == b"<bos>" + "中文".encode() + b"<eos>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode_bytes([len(tok)])


def test_save_pretrained_autotokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    plain = AutoTokenizer.from_pretrained(tmp_path)
    ours = BytePieceTokenizerFast.from_pretrained(tmp_path)
    assert not isinstance(plain, BytePieceTokenizerFast) and isinstance(ours, BytePieceTokenizerFast)
    texts = list(TEXTS.values())
    expected = tok(texts)["input_ids"]
    assert plain(texts)["input_ids"] == expected
    assert ours(texts)["input_ids"] == expected
    assert (plain.pad_token_id, plain.bos_token_id, plain.eos_token_id) == (0, 1, 2)
    # tokenizers' own JSON parser reads every saved score back bit-exactly (see json_float)
    rust = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rust_scores = [s for _, s in json.loads(rust.model.__getstate__())["vocab"][3:]]
    assert np.array_equal(rust_scores, tok.bytepiece_vocab().log_probs)


def test_load_tokenizer_gives_the_fast_class_with_saved_settings(tmp_path):
    from transformers import AutoTokenizer

    model = GOLDEN["models"]["id0_eu0"]["model"]
    settings = {"add_bos_token": True, "add_eos_token": True, "padding_side": "left", "model_max_length": 77}
    tok = BytePieceTokenizerFast.from_bytepiece(model, **settings)
    tok.save_pretrained(tmp_path / "bp")
    loaded = load_tokenizer(tmp_path / "bp")
    assert isinstance(loaded, BytePieceTokenizerFast)
    assert (loaded.padding_side, loaded.model_max_length) == ("left", 77)
    texts = list(TEXTS.values())
    assert (
        loaded(texts)["input_ids"]
        == tok(texts)["input_ids"]
        == AutoTokenizer.from_pretrained(tmp_path / "bp")(texts)["input_ids"]
    )
    assert loaded("x")["input_ids"][0] == 1 and loaded("x")["input_ids"][-1] == 2
    model_file = _write_model(tmp_path, model)  # a reference model file
    assert (
        load_tokenizer(model_file)(texts)["input_ids"]
        == BytePieceTokenizerFast.from_bytepiece(model)(texts)["input_ids"]
    )
    other = tiny_tokenizer(300, max_chars=20_000)  # byte-level BPE: loaded by AutoTokenizer as it is
    other.save_pretrained(tmp_path / "bpe")
    plain = load_tokenizer(tmp_path / "bpe")
    assert not isinstance(plain, BytePieceTokenizerFast)
    assert plain(texts)["input_ids"] == other(texts)["input_ids"]


def test_autotokenizer_without_hf_su(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    code = (
        "import json, sys; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r}); "
        "print(json.dumps(t([sys.argv[1]])['input_ids'])); assert 'hf_su' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code, TEXTS["mixed"]], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [tok.encode(TEXTS["mixed"])]


def test_pickle_and_deepcopy_keep_exact_scores(tok):
    tok("built")  # the C segmenter, when there is one, exists now and must not be pickled
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        scores = [s for _, s in json.loads(clone.backend_tokenizer.model.__getstate__())["vocab"][3:]]
        assert np.array_equal(scores, tok.bytepiece_vocab().log_probs)
        assert clone(list(TEXTS.values()))["input_ids"] == tok(list(TEXTS.values()))["input_ids"]


def test_json_float_is_read_exactly_by_rust_and_python():
    rng = np.random.default_rng(0)
    values = [float(v) for v in -np.exp(rng.uniform(-3, 3.5, 3000))]
    vocab = ",".join(f'["t{i}",{json_float(v)}]' for i, v in enumerate(values))
    text = (
        '{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,'
        '"pre_tokenizer":null,"post_processor":null,"decoder":null,'
        f'"model":{{"type":"Unigram","unk_id":null,"vocab":[{vocab}],"byte_fallback":false}}}}'
    )
    assert [s for _, s in json.loads(text)["model"]["vocab"]] == values
    parsed = [s for _, s in json.loads(Tokenizer.from_str(text).model.__getstate__())["vocab"]]
    exact = sum(a == b for a, b in zip(parsed, values))
    assert exact >= 0.99 * len(values)  # values serde_json cannot produce at all stay 1 ulp off (rare)
    plain = [
        s
        for _, s in json.loads(
            Tokenizer.from_str(
                text.replace(vocab, ",".join(f'["t{i}",{v!r}]' for i, v in enumerate(values)))
            ).model.__getstate__()
        )["vocab"]
    ]
    assert sum(a == b for a, b in zip(plain, values)) < exact  # the shortest repr alone is lossy in Rust


# --- special tokens, batching, padding, truncation, offsets ------------------------------------------------------


def test_special_tokens(tok, tokenizers):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = TEXTS["special_strings"]
    ids = tok.encode(text)
    assert not {0, 1, 2} & set(ids)  # the literal strings are plain bytes, as in the reference
    assert tok(text, add_special_tokens=True)["input_ids"] == ids  # nothing is added by default
    both = BytePieceTokenizerFast.from_bytepiece(
        GOLDEN["models"]["id0_eu0"]["model"], add_bos_token=True, add_eos_token=True
    )
    assert both.encode(text) == [1, *ids, 2]
    assert both.encode(text, add_special_tokens=False) == ids
    assert both(text, return_offsets_mapping=True)["input_ids"] == [1, *ids, 2]
    assert both.decode(both.encode(text), skip_special_tokens=True) == text
    unsplit = BytePieceTokenizerFast.from_bytepiece(GOLDEN["models"]["id0_eu0"]["model"], split_special_tokens=False)
    assert unsplit.encode("x<eos>")[-1] == 2


def test_fast_path_equals_full_pipeline(tok, bytepiece_segmenter):
    texts = list(TEXTS.values())
    for kwargs in (
        {},
        {"padding": True},
        {"padding": "max_length", "max_length": 4000},
        {"padding": True, "pad_to_multiple_of": 8, "padding_side": "left"},
        {"padding": True, "return_tensors": "pt"},
        {"return_attention_mask": False},
    ):
        fast = tok(texts, **kwargs)
        full = tok(texts, return_offsets_mapping=True, **kwargs)
        assert fast.encodings is None and full.encodings is not None
        assert set(fast) == set(full) - {"offset_mapping"}
        for key in fast:
            a, b = fast[key], full[key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (kwargs, key)
    single = tok(TEXTS["english"], return_tensors="pt")["input_ids"]
    assert single.shape == (1, len(tok.encode(TEXTS["english"])))


def test_truncation_and_overflow(tok):
    ids = tok.encode(TEXTS["long_line"])
    out = tok(TEXTS["long_line"], truncation=True, max_length=100)
    assert out["input_ids"] == ids[:100]
    over = tok(TEXTS["long_line"], truncation=True, max_length=100, stride=10, return_overflowing_tokens=True)
    assert over["input_ids"][0] == ids[:100] and over["input_ids"][1][:10] == ids[90:100]


def test_offsets_point_at_the_source_text(tok):
    for key in ("english", "chinese", "emoji", "code"):
        text = TEXTS[key]
        enc = tok(text, return_offsets_mapping=True)
        pieces = [tok.bytepiece_vocab().pieces[i - 3] for i in enc["input_ids"]]
        for (start, end), piece in zip(enc["offset_mapping"], pieces):
            span = text[start:end].encode()
            assert piece in span  # a piece lies inside the characters it covers (equal unless it splits one)
        assert enc["offset_mapping"][0][0] == 0 and enc["offset_mapping"][-1][1] == len(text)


def test_datasets_map_batched(tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": list(TEXTS.values())})
    mapped = ds.map(lambda batch: tok(batch["text"]), batched=True, batch_size=4)
    assert mapped["input_ids"] == [tok.encode(t) for t in TEXTS.values()]


def test_encode_sampled_on_the_adapter(tok):
    texts = ["abc 中文 abcabc", "x", "科学空间 scientific spaces\n"]
    # alpha < 0 is the deterministic segmentation, a str gives one list
    assert tok.encode_sampled(texts, alpha=-1) == [tok.encode(t) for t in texts]
    assert tok.encode_sampled(texts[0], alpha=-1) == tok.encode(texts[0])
    # sampled segmentations decode to the same text, vary with the seed, and repeat for a fixed seed
    draws = [tuple(tok.encode_sampled(texts[2], alpha=0.0, seed=seed)) for seed in range(20)]
    assert all(tok.decode(list(d)) == texts[2] for d in draws)
    assert len(set(draws)) > 1
    assert tok.encode_sampled(texts, alpha=0.1, seed=3) == tok.encode_sampled(texts, alpha=0.1, seed=3)


# --- errors ------------------------------------------------------------------------------------------------------


def _model(n_extra: int = 2) -> dict:
    pieces = [bytes([b]) for b in range(256)] + [b"ab", "中".encode()][:n_extra]
    return {base64.b64encode(p).decode(): [i + 3, p.decode(errors="ignore"), 5] for i, p in enumerate(pieces)}


def test_model_file_errors(tmp_path):
    read_bytepiece_model(_model())  # valid
    (tmp_path / "bad.model").write_text("not json {", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        BytePieceTokenizerFast.from_bytepiece(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_bytepiece_model(_write_model(tmp_path, [1, 2, 3]))
    bad_key = _model()
    bad_key["!!notbase64"] = [300, "x", 1]
    with pytest.raises(ValueError, match="not valid base64"):
        read_bytepiece_model(bad_key)
    duplicate_id = _model()
    duplicate_id[base64.b64encode(b"ab").decode()][0] = 3
    with pytest.raises(ValueError, match="duplicate id 3"):
        read_bytepiece_model(duplicate_id)
    missing_id = _model()
    missing_id[base64.b64encode(b"ab").decode()][0] = 400
    with pytest.raises(ValueError, match=r"missing \[259\]"):
        read_bytepiece_model(missing_id)
    no_byte = _model()
    del no_byte[base64.b64encode(b"\x41").decode()]
    no_byte[base64.b64encode(b"xyz").decode()] = [3 + 0x41, "xyz", 1]
    with pytest.raises(ValueError, match="single-byte pieces are missing"):
        read_bytepiece_model(no_byte)
    small = {base64.b64encode(bytes([b])).decode(): [b + 3, "", 1] for b in range(100)}
    with pytest.raises(ValueError, match="vocabulary too small"):
        read_bytepiece_model(small)
    same_piece = _model()
    same_piece["AB=="] = [261, "", 1]  # non-canonical base64 of b"\x00"
    with pytest.raises(ValueError, match="(not valid base64|same piece)"):
        read_bytepiece_model(same_piece)
    (tmp_path / "dup.model").write_text('{"AA==": [3, "", 1], "AA==": [4, "", 1]}', encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate key"):
        read_bytepiece_model(tmp_path / "dup.model")
    zero = _model()
    zero[base64.b64encode(b"ab").decode()][2] = 0
    with pytest.raises(ValueError, match="positive integer"):
        read_bytepiece_model(zero)
    with pytest.raises(TypeError):
        read_bytepiece_model(42)


def test_lone_surrogate_is_a_clear_error(tok):
    for call in (lambda: tok.encode("ab\ud800c"), lambda: tok(["ok", "\udfff"]), lambda: bytepiece_chunks("\ud83d")):
        with pytest.raises(ValueError, match="lone surrogate"):
            call()
    with pytest.raises(ValueError, match="lone surrogate"):
        train_bytepiece(["ok", "bad\ud800"], 300, os.devnull, progress=False, workers=1)


def test_not_a_bytepiece_pipeline(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from hf_su.testing import tiny_tokenizer

    tiny_tokenizer(vocab_size=300, max_chars=5000).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a BytePiece"):
        BytePieceTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert isinstance(PreTrainedTokenizerFast.from_pretrained(tmp_path), PreTrainedTokenizerFast)


# --- training ----------------------------------------------------------------------------------------------------


def test_train_loads_round_trips_and_is_deterministic(training_docs, tmp_path):
    one = train_bytepiece(training_docs, 500, tmp_path / "one.model", workers=1, progress=False)
    two = train_bytepiece(iter(training_docs), 500, tmp_path / "two.model", workers=2, progress=False)
    assert one == str(tmp_path / "one.model")
    with open(one, encoding="utf-8") as f1, open(two, encoding="utf-8") as f2:
        assert f1.read() == f2.read()
    pieces, counts = read_bytepiece_model(one)
    assert 400 < len(pieces) + 3 <= 500 and all(c > 0 for c in counts)
    assert pieces == sorted(pieces, key=lambda p: (len(p), p))
    tok = BytePieceTokenizerFast.from_bytepiece(one)
    for text in TEXTS.values():
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    sample = "\n".join(training_docs[:3])
    assert len(sample.encode()) / len(tok.encode(sample)) > 1.5  # it learned multi-byte pieces


def test_train_same_model_without_the_c_segmenter(training_docs, tmp_path, monkeypatch):
    if bytepiece_module._viterbi is None:
        pytest.skip("the C segmenter hf_su.tokenization._viterbi is not built")
    with_c = train_bytepiece(training_docs, 450, tmp_path / "c.model", progress=False)
    monkeypatch.setattr(bytepiece_module, "_viterbi", None)  # the re-splits run on the tokenizers Unigram model
    without = train_bytepiece(training_docs, 450, tmp_path / "rust.model", progress=False)
    with open(with_c, encoding="utf-8") as f1, open(without, encoding="utf-8") as f2:
        assert f1.read() == f2.read()


def test_train_options(training_docs, tmp_path):
    digits = train_bytepiece(
        [*training_docs, "12345 67890 " * 50], 500, tmp_path / "d.model", isolate_digits=True, progress=False
    )
    pieces, _ = read_bytepiece_model(digits)
    assert not any(len(p) > 1 and any(chr(b).isdigit() for b in p) for p in pieces)
    unicode = train_bytepiece(training_docs, 500, tmp_path / "u.model", ensure_unicode=True, progress=False)
    pieces, _ = read_bytepiece_model(unicode)
    assert not any(len(p) > 1 and 0x80 <= p[0] < 0xC0 for p in pieces)  # no piece starts inside a character
    short = train_bytepiece(training_docs, 500, tmp_path / "s.model", max_piece_length=3, progress=False)
    assert max(len(p) for p in read_bytepiece_model(short)[0]) <= 3


@needs_reference
@pytest.mark.parametrize(("isolate_digits", "ensure_unicode"), [(False, False), (True, True)])
def test_train_matches_reference_trainer(
    training_docs, tmp_path, isolate_digits, ensure_unicode, capfd, bytepiece_segmenter
):
    ours = train_bytepiece(
        training_docs,
        450,
        tmp_path / "ours.model",
        isolate_digits=isolate_digits,
        ensure_unicode=ensure_unicode,
        progress=False,
    )
    trainer = reference.Trainer(
        order=6,
        max_vocab_size=450,
        max_piece_length=36,
        min_count=2,
        isolate_digits=isolate_digits,
        ensure_unicode=ensure_unicode,
    )
    trainer.train(training_docs, workers=1)
    with open(ours, encoding="utf-8") as f:
        assert json.load(f) == trainer.dump(trainer.pieces[0])  # the same model file
    ref_tok, our_tok = reference.Tokenizer(ours), BytePieceTokenizerFast.from_bytepiece(ours)
    texts = list(TEXTS.values())
    assert our_tok(texts)["input_ids"] == [ref_tok.encode(t) for t in texts]


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        train_bytepiece(["abc"], 200, tmp_path / "x.model", progress=False)
    with pytest.raises(TypeError, match="not a single string"):
        train_bytepiece("abc", 300, tmp_path / "x.model", progress=False)
    with pytest.raises(TypeError, match="must hold str"):
        train_bytepiece(["abc", 3], 300, tmp_path / "x.model", progress=False)
    with pytest.raises(ValueError, match="order"):
        train_bytepiece(["abc"], 300, tmp_path / "x.model", order=9, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_bytepiece(["", ""], 300, tmp_path / "x.model", progress=False)


def test_byte_table_matches_tokenizers_byte_level():
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = bytes(range(256)).decode("latin-1")
    mapped = "".join(piece for piece, _ in byte_level.pre_tokenize_str(text))
    # ByteLevel maps UTF-8 bytes: code points 0-127 are one byte, 128-255 two bytes (0xC2/0xC3 + continuation)
    expected = "".join(BYTE_TO_CHAR[b] for b in text.encode())
    assert mapped == expected and len(set(BYTE_TO_CHAR)) == 256
