"""HWFA (hf_su.modeling.hwfa) against naive float64 attention with explicit band / causal masks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import sdpa_mask

from hf_su.modeling.hwfa import HWFA_ATTENTION, hwfa_config, load_causal_lm, load_config, sliding_window_attention
from hf_su.testing import tiny_config

from .conftest import tolerance

HWFA_ARCHS = ("llama", "qwen2", "qwen3")
REFERENCE = "hf_su_test_hwfa_reference"
EXACT = tolerance(torch.float64)


def _dense_attention(query, key, value, allowed, scale):
    """Naive attention, float64: scores, -inf outside ``allowed``, softmax (fully masked rows -> 0), weights @ v."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).double()
    value = value.repeat_interleave(groups, dim=1).double()
    scores = query.double() @ key.transpose(-1, -2) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ value).to(query.dtype)


def _band(q_len: int, kv_len: int, window: int | None) -> torch.Tensor:
    """Explicit mask for queries at key indices ``kv_len - q_len ..``: causal, and ``i - window < j`` if windowed."""
    i = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    allowed = j <= i
    return allowed & (j > i - window) if window is not None else allowed


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered test attention: dense float64 with masks built from the HWFA settings, full sequence only."""
    hwfa = module.config.hwfa
    n = query.shape[-2]
    assert key.shape[-2] == n, "the reference runs full forwards without cache"
    is_window = module.layer_idx not in hwfa["full_layers"]
    if not is_window and hwfa["log_scale_base"] is not None:
        factors = [max(1.0, math.log(p + 1) / math.log(hwfa["log_scale_base"])) for p in range(n)]
        query = query * torch.tensor(factors, dtype=query.dtype)[:, None]
    allowed = _band(n, n, hwfa["window"] if is_window else None)
    return _dense_attention(query, key, value, allowed, scaling).transpose(1, 2), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def _model(arch="llama", window=4, full_layers=(2,), layers=4, log_scale_base=None, dtype=torch.float64):
    config = hwfa_config(
        tiny_config(arch, num_hidden_layers=layers), window, list(full_layers), log_scale_base=log_scale_base
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _ids(batch=2, n=24, seed=1):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _attention_outputs(model, ids):
    """Logits and each layer's attention output of a full forward."""
    outputs, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda mod, args, out: outputs.append(out[0])))
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, outputs


# ---- the attention op ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q_len", "kv_len", "window", "block"),
    [
        (37, 37, 5, 64),
        (37, 50, 5, 8),
        (1, 9, 4, 64),
        (3, 9, 4, 2),
        (100, 100, 7, 16),
        (10, 10, 64, 64),
        (90, 120, 40, 16),
    ],
)
def test_sliding_window_attention_equals_banded_reference(q_len, kv_len, window, block):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, kv_len, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    padding = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool)
    padding[1, ..., :3] = False  # left padding of the second sequence, so some rows see nothing
    for mask in (None, padding):
        out = sliding_window_attention(q, k, v, window, attention_mask=mask, scale=0.3, block_size=block)
        allowed = _band(q_len, kv_len, window) & (padding if mask is not None else True)
        torch.testing.assert_close(out, _dense_attention(q, k, v, allowed, 0.3), **EXACT)


def test_sliding_window_attention_gradients_equal_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(1, 4, 40, 8, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad((sliding_window_attention(q, k, v, 6, block_size=8) * weight).sum(), (q, k, v))
    ref = torch.autograd.grad((_dense_attention(q, k, v, _band(40, 40, 6), 8**-0.5) * weight).sum(), (q, k, v))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def test_sliding_window_attention_rejects_bad_input():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="at least as many keys"):
        sliding_window_attention(q, q[:, :, :2], q[:, :, :2], 3)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, q, q, 0)
    with pytest.raises(TypeError, match="boolean"):
        sliding_window_attention(q, q, q, 3, attention_mask=torch.zeros(1, 1, 4, 4))


# ---- hwfa_config -----------------------------------------------------------------------------------------------


def test_hwfa_config_sets_structure_on_a_copy():
    base = tiny_config("llama", num_hidden_layers=6)
    cfg = hwfa_config(base, window=8)
    assert cfg.layer_types == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2  # L // 2
    assert cfg.sliding_window == 8
    assert cfg.hwfa == {"window": 8, "full_layers": [3], "log_scale_base": None}
    assert cfg._attn_implementation == HWFA_ATTENTION
    assert not hasattr(base, "hwfa") and getattr(base, "layer_types", None) is None and base is not cfg
    assert hwfa_config(base, 8, [4, 2]).hwfa["full_layers"] == [2, 4]
    assert "full_attention" not in hwfa_config(base, 8, []).layer_types


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(window=1), ValueError, "window must be >= 2"),
        (dict(window=0), ValueError, "window must be >= 2"),
        (dict(window=4.0), TypeError, "window must be an int"),
        (dict(full_layers=[4]), ValueError, "out of range"),
        (dict(full_layers=[-1]), ValueError, "out of range"),
        (dict(full_layers=[1, 1]), ValueError, "repeated"),
        (dict(full_layers=[0, 1, 2, 3]), ValueError, "at least one window layer"),
        (dict(full_layers=2), TypeError, "sequence"),
        (dict(log_scale_base=1), ValueError, "log_scale_base"),
        (dict(log_scale_base="512"), TypeError, "log_scale_base"),
    ],
)
def test_hwfa_config_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hwfa_config(tiny_config("llama", num_hidden_layers=4), **{"window": 4, **kwargs})


@pytest.mark.parametrize("arch", ["mistral", "gemma", "gpt2"])
def test_hwfa_config_rejects_unsupported_architectures(arch):
    with pytest.raises(ValueError, match="supports the architectures"):
        hwfa_config(tiny_config(arch))


# ---- models ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", HWFA_ARCHS)
def test_window_and_full_layers_equal_dense_reference(arch):
    model = _model(arch, window=4, full_layers=(1,), layers=3)
    ids = _ids()
    logits, per_layer = _attention_outputs(model, ids)
    model.set_attn_implementation(REFERENCE)
    ref_logits, ref_per_layer = _attention_outputs(model, ids)
    for ours, ref in zip(per_layer, ref_per_layer, strict=True):
        torch.testing.assert_close(ours, ref, **EXACT)
    torch.testing.assert_close(logits, ref_logits, **EXACT)


def test_window_layers_see_exactly_the_window():
    """A window layer's output at i changes with key i - w + 1 and not with key i - w (one-layer receptive field)."""
    model = _model("llama", window=4, full_layers=(), layers=1)
    ids = _ids(batch=1, n=12)
    base = model(ids).logits
    for j, changes in ((6, True), (5, False)):  # position 9 sees 6..9
        moved = ids.clone()
        moved[0, j] = (ids[0, j] + 7) % 500 + 3
        delta = (model(moved).logits - base)[0, 9].abs().max().item()
        assert (delta > 1e-6) is changes, (j, delta)


def test_log_scale_applies_to_full_layers_only():
    model = _model("llama", window=4, full_layers=(1,), layers=3, log_scale_base=8)
    ids = _ids(n=30)
    logits, per_layer = _attention_outputs(model, ids)
    model.set_attn_implementation(REFERENCE)
    ref_logits, ref_per_layer = _attention_outputs(model, ids)
    for ours, ref in zip(per_layer, ref_per_layer, strict=True):
        torch.testing.assert_close(ours, ref, **EXACT)
    unscaled = _model("llama", window=4, full_layers=(1,), layers=3)
    assert (unscaled(ids).logits - logits).abs().max() > 1e-6


@pytest.mark.parametrize("arch", HWFA_ARCHS)
def test_incremental_decoding_equals_full_recomputation_and_cache_is_bounded(arch):
    window, n = 5, 23
    model = _model(arch, window=window, full_layers=(1,), layers=3)
    ids = _ids(n=n)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    steps = [(0, 6), *[(t, t + 1) for t in range(6, 14)], (14, 17), (17, n)]  # prefill, decode, chunks
    pieces = []
    for start, stop in steps:
        pieces.append(model(ids[:, start:stop], cache=cache, use_cache=True).logits)
        for idx, layer in enumerate(cache.layers):
            if idx == 1:
                assert not isinstance(layer, DynamicSlidingWindowLayer) and layer.keys.shape[-2] == stop
            else:
                assert isinstance(layer, DynamicSlidingWindowLayer) and layer.keys.shape[-2] <= window
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **EXACT)
    assert cache.get_seq_length() == n


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_generate_equals_unpadded(arch):
    model = _model(arch, window=4, full_layers=(1,), layers=3)
    short, long = _ids(batch=1, n=6, seed=2), _ids(batch=1, n=11, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(batch, attention_mask=mask, **settings)
    assert together[0, 5:].tolist() == model.generate(short, **settings)[0].tolist()
    assert together[1].tolist() == model.generate(long, **settings)[0].tolist()


@pytest.mark.parametrize("arch", HWFA_ARCHS)
def test_gradients_equal_reference(arch):
    model = _model(arch, window=3, full_layers=(1,), layers=3)
    ids = _ids(n=16)

    def grads():
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ours = grads()
    model.set_attn_implementation(REFERENCE)
    ref = grads()
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], **EXACT, msg=name)


@pytest.mark.parametrize("arch", HWFA_ARCHS)
def test_save_and_reload_keeps_the_hybrid_structure(arch, tmp_path):
    model = _model(arch, window=4, full_layers=(1,), layers=3, dtype=torch.float32)
    ids = _ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == model.config.layer_types
    assert reloaded.config.hwfa == model.config.hwfa
    # Llama needs the HWFA attention and gets it back from config.json; Qwen windows natively under plain SDPA.
    assert reloaded.config._attn_implementation == (HWFA_ATTENTION if arch == "llama" else "sdpa")
    torch.testing.assert_close(reloaded(ids).logits, expected, **tolerance(torch.float32))
    if arch != "llama":
        reloaded.set_attn_implementation(HWFA_ATTENTION)
        torch.testing.assert_close(reloaded(ids).logits, expected, **tolerance(torch.float32))


def test_full_layers_equal_rerope_after_patch_rerope():
    rerope = pytest.importorskip("hf_su.modeling.rerope")
    rerope_window = 6
    model = _model("llama", window=4, full_layers=(1,), layers=3)
    ids = _ids(n=20)
    rotary = model.model.rotary_emb
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = (t[0, :, None].transpose(0, 1) for t in rotary(torch.zeros(1, dtype=torch.float64), positions))
    cos_w, sin_w = (t[0, 0] for t in rotary(torch.zeros(1, dtype=torch.float64), torch.tensor([[rerope_window]])))

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def rerope_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        n = query.shape[-2]
        if module.layer_idx not in module.config.hwfa["full_layers"]:
            allowed = _band(n, n, module.config.hwfa["window"])
            return _dense_attention(query, key, value, allowed, scaling).transpose(1, 2), None
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        raw_q, raw_k = (x * cos - rotate_half(x) * sin for x in (query, key))  # undo the model's RoPE
        far_q = raw_q * cos_w + rotate_half(raw_q) * sin_w  # relative position clipped at the ReRoPE window
        distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        scores = torch.where(distance < rerope_window, query @ key.transpose(-1, -2), far_q @ raw_k.transpose(-1, -2))
        scores = (scores * scaling).masked_fill(distance < 0, float("-inf"))
        return (torch.softmax(scores, -1) @ value).transpose(1, 2), None

    AttentionInterface.register("hf_su_test_hwfa_rerope_reference", rerope_reference)
    AttentionMaskInterface.register("hf_su_test_hwfa_rerope_reference", sdpa_mask)
    model.set_attn_implementation("hf_su_test_hwfa_rerope_reference")
    expected = model(ids, use_cache=False).logits
    model.set_attn_implementation(HWFA_ATTENTION)
    patched = rerope.patch_rerope(model, window=rerope_window)
    # transformers builds its cos/sin tables in float32: ReRoPE re-rotates with its own tables, so the two agree to
    # float32 rotation precision (~1e-8 here), far below the ReRoPE effect itself (~1e-3 on these logits).
    torch.testing.assert_close(patched(ids, use_cache=False).logits, expected, rtol=1e-6, atol=1e-7)


def test_patch_rerope_keeps_window_layers_bounded_and_survives_reload(tmp_path):
    rerope = pytest.importorskip("hf_su.modeling.rerope")
    model = _model("llama", window=4, full_layers=(1,), layers=3)
    ids = _ids(n=20)
    model.save_pretrained(tmp_path)
    rerope.patch_rerope(model, window=6)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    pieces = [model(ids[:, :7], cache=cache, use_cache=True).logits]
    for t in range(7, ids.shape[1]):
        pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        assert all(cache.layers[i].keys.shape[-2] <= 4 for i in (0, 2))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **EXACT)
    reloaded = rerope.patch_rerope(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64), window=6)
    torch.testing.assert_close(reloaded.eval()(ids, use_cache=False).logits, full, **EXACT)


# ---- static caches ---------------------------------------------------------------------------------------------

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_logits=True)


def _left_padded_batch(pad=7):
    """A 2-token prompt (shorter than the window) left-padded next to a 9-token one."""
    short, long = _ids(batch=1, n=2, seed=2), _ids(batch=1, n=pad + 2, seed=3)
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


@pytest.mark.parametrize(("arch", "full_layers"), [("llama", (1,)), ("llama", ()), ("qwen2", (1,)), ("qwen3", (1,))])
@pytest.mark.parametrize("max_cache_len", [13, 20])
def test_static_cache_forward_equals_dynamic_and_full_recomputation(arch, full_layers, max_cache_len):
    """Window layers' StaticSlidingWindowLayer through every state (filling, becoming full, full, chunks after full),
    full layers' StaticLayer with empty slots or exactly filled, left padding; ``full_layers=()`` sizes Llama's one
    mask by a window layer."""
    model = _model(arch, window=4, full_layers=full_layers, layers=3)
    ids = _ids(n=13)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    steps = [(0, 2), (2, 3), (3, 4), (4, 5), (5, 9), (9, 10), (10, 13)]

    def run(cache):
        return torch.cat(
            [
                model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=positions[:, a:b], cache=cache).logits
                for a, b in steps
            ],
            dim=1,
        )

    static = run(StaticCache(config=model.config, max_cache_len=max_cache_len))
    dynamic = run(DynamicCache(config=model.config))
    real = mask.bool()
    torch.testing.assert_close(static[real], dynamic[real], **EXACT)
    torch.testing.assert_close(static[real], full[real], **EXACT)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_generate_with_static_cache_equals_dynamic(arch):
    model = _model(arch, window=4, full_layers=(1,), layers=3, log_scale_base=6 if arch == "qwen2" else None)
    batch, mask = _left_padded_batch()
    for ids, attention_mask in ((batch[:1, -2:], None), (batch, mask)):  # a prompt shorter than the window alone
        settings = dict(attention_mask=attention_mask, max_new_tokens=8, **GREEDY)
        dynamic = model.generate(ids, **settings)
        for static_kwargs in (
            dict(cache_implementation="static"),
            dict(cache=StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8)),
        ):
            static = model.generate(ids, **settings, **static_kwargs)
            assert static.sequences.tolist() == dynamic.sequences.tolist()
            torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), **EXACT)


def test_llama_generate_with_static_cache_is_refused_clearly():
    model = _model("llama", window=4, full_layers=(1,), layers=3)
    ids, mask = _left_padded_batch()
    settings = dict(attention_mask=mask, max_new_tokens=3, **GREEDY)
    for static_kwargs in (
        dict(cache_implementation="static"),
        dict(cache=StaticCache(config=model.config, max_cache_len=20)),
    ):
        with pytest.raises(ValueError, match="static cache .* not supported by HWFA llama.* default dynamic cache"):
            model.generate(ids, **settings, **static_kwargs)
    assert model.generate(ids, **settings).sequences.shape == (2, ids.shape[1] + 3)  # the alternative works


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_is_refused_after_patch_rerope(arch):
    rerope = pytest.importorskip("hf_su.modeling.rerope")
    model = rerope.patch_rerope(_model(arch, window=4, full_layers=(1,), layers=3), window=3)
    ids, mask = _left_padded_batch()
    with pytest.raises(ValueError, match="(?i)static ?cache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, cache_implementation="static", **GREEDY)
    with pytest.raises(ValueError, match="(?i)static ?cache"):
        model(ids, attention_mask=mask, cache=StaticCache(config=model.config, max_cache_len=20))


# ---- saving a reloaded model again -----------------------------------------------------------------------------

_FRESH_PROCESS_CHECK = """
import sys, torch
import hf_su.modeling.hwfa  # registers the implementation; the rest is plain transformers
from transformers import AutoModelForCausalLM

for folder in sys.argv[1:]:
    expected = torch.load(folder + "/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(folder + "/twice").eval()
    assert model.config._attn_implementation == "hf_su_hwfa", model.config._attn_implementation
    torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
"""


def test_resaved_reloaded_model_keeps_its_attention_in_a_fresh_process(tmp_path):
    folders = []
    for arch, log_scale_base in (("llama", None), ("qwen2", 8)):  # the two kinds that need HWFA_ATTENTION
        folder = tmp_path / arch
        model = _model(arch, window=4, full_layers=(1,), layers=3, log_scale_base=log_scale_base, dtype=torch.float32)
        ids = _ids(n=20)
        folder.mkdir()
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, folder / "expected.pt")
        model.save_pretrained(folder / "once")
        load_causal_lm(str(folder / "once")).save_pretrained(folder / "twice")
        # nothing of the saved config changes on the way (structure, settings, implementation name)
        once, twice = (json.loads((folder / name / "config.json").read_text()) for name in ("once", "twice"))
        assert twice == once and twice["attn_implementation"] == HWFA_ATTENTION
        folders.append(str(folder))
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CHECK, *folders], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _saved_without_implementation(folder):
    """Save an HWFA llama, then drop the implementation name from config.json as re-saving a plain reload did."""
    model = _model("llama", window=4, full_layers=(1,), layers=3, dtype=torch.float32)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["attn_implementation"]
    (folder / "config.json").write_text(json.dumps(config))
    assert AutoModelForCausalLM.from_pretrained(folder).config._attn_implementation == "sdpa"  # silently full attention
    return model


def test_load_causal_lm_restores_an_implementation_a_resave_lost(tmp_path):
    model = _saved_without_implementation(tmp_path / "lost")
    ids = _ids()
    restored = load_causal_lm(str(tmp_path / "lost")).eval()
    assert restored.config._attn_implementation == HWFA_ATTENTION
    torch.testing.assert_close(restored(ids).logits, model(ids).logits, **tolerance(torch.float32))
    restored.save_pretrained(tmp_path / "restored")
    assert json.loads((tmp_path / "restored" / "config.json").read_text())["attn_implementation"] == HWFA_ATTENTION
    for load in (load_causal_lm, load_config):
        with pytest.raises(ValueError, match="needs attn_implementation='hf_su_hwfa'.*window layers"):
            load(str(tmp_path / "lost"), attn_implementation="sdpa")


def test_hf_su_train_on_a_saved_model_keeps_its_attention(tmp_path):
    """``hf-su train --model <saved HWFA llama>`` builds its config with load_config, so its output re-saves intact."""
    from hf_su.pipeline import TrainSettings, _model_config

    _saved_without_implementation(tmp_path / "lost")
    config = _model_config(TrainSettings(model=str(tmp_path / "lost")), vocab_size=512)
    assert config._attn_implementation == HWFA_ATTENTION and config.to_dict()["attn_implementation"] == HWFA_ATTENTION
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["attn_implementation"] == HWFA_ATTENTION


def test_loaders_leave_natively_windowed_models_alone(tmp_path):
    _model("qwen2", window=4, full_layers=(1,), layers=3, dtype=torch.float32).save_pretrained(tmp_path / "qwen")
    for kwargs, implementation in (({}, "sdpa"), ({"attn_implementation": "eager"}, "eager")):
        model = load_causal_lm(str(tmp_path / "qwen"), **kwargs)
        assert model.config._attn_implementation == implementation
        assert "attn_implementation" not in model.config.to_dict()
    assert "attn_implementation" not in load_config(str(tmp_path / "qwen")).to_dict()
