"""patch_rerope / unpatch_rerope end to end on tiny models, against a naive float64 reference.

The reference (``NaiveReRoPE``) is written independently of hf_su: it builds, for every query/key pair, the explicit
n x n map of the positions the query and the key are rotated to (``i, j`` inside the window, the ReRoPE / Leaky
ReRoPE positions outside), rotates q and k per pair, and runs one dense softmax. No log-sum-exp merge, no cache, no
banding. Rotation angles are computed as Hugging Face rotary modules compute them (float32 angles, then cast), so a
float64 model matches it to ~1e-15.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask

from hf_su.modeling.rerope import patch_rerope, unpatch_rerope
from tests.conftest import tolerance

WINDOW, LEAKY, LOG_BASE, SEQ = 5, 4.0, 8, 23  # window < sequence so near and far parts are both exercised
MODES = {
    "rerope": dict(leaky=None, log_scale_base=None),
    "leaky": dict(leaky=LEAKY, log_scale_base=None),
    "rerope-logn": dict(leaky=None, log_scale_base=LOG_BASE),
    "leaky-logn": dict(leaky=LEAKY, log_scale_base=LOG_BASE),
}


# --------------------------------------------------------------------------------------------------------------------
# Independent reference


def _rotary_module(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def _rotate_pairs(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float):
    """Rotate ``x [B, H, n, D]`` per (query, key) pair: ``positions [B, n, n]`` -> ``[B, H, n, n, D]``.

    The first ``2 * len(inv_freq)`` features are rotated in the rotate-half layout, the rest pass through.
    """
    ang = positions.float().unsqueeze(-1) * inv_freq.float()  # float32 angles, as HF rotary modules do
    cos = (torch.cat([ang, ang], -1).cos() * attention_scaling).to(x.dtype).unsqueeze(1)
    sin = (torch.cat([ang, ang], -1).sin() * attention_scaling).to(x.dtype).unsqueeze(1)
    rot = 2 * inv_freq.numel()
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    partner = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return xr, partner, xp, cos, sin


class NaiveReRoPE:
    """Float64 reference model: explicit per-pair position map, dense softmax, no cache."""

    name = "hf_su_test_naive_rerope"

    def __init__(self, model, window: int, leaky: float | None, log_scale_base: float | None):
        self.model = copy.deepcopy(model).to(torch.float64)
        self.model.config = self.model.config  # the deep copy owns its config
        self.window, self.leaky, self.log_scale_base = window, leaky, log_scale_base
        rotary = _rotary_module(self.model)
        rotary.register_forward_hook(lambda m, a, out: (torch.ones_like(out[0]), torch.zeros_like(out[1])))
        for module in self.model.modules():
            if hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention"):
                module._naive_ref = (self, rotary)
        AttentionInterface.register(self.name, _naive_attention)
        AttentionMaskInterface.register(self.name, eager_mask)
        self.model.set_attn_implementation(self.name)

    def positions(self, pos: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair (i, j): the positions query i and key j are rotated to, ``[B, n, n]`` float64 each."""
        i = pos.to(torch.float64)[:, :, None].expand(-1, -1, pos.shape[1])
        j = pos.to(torch.float64)[:, None, :].expand(-1, pos.shape[1], -1)
        if not full:
            return i, j
        w = self.window
        near = (i - j) < w
        if self.leaky is None:
            far_i, far_j = torch.full_like(i, float(w)), torch.zeros_like(j)
        else:
            far_i, far_j = w + (i - w) / self.leaky, j / self.leaky
        return torch.where(near, i, far_i), torch.where(near, j, far_j)


def _naive_attention(module, q, k, v, mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    ref, rotary = module._naive_ref
    b, h, n, d = q.shape
    layer_types = getattr(module.config, "layer_types", None)
    layer_type = layer_types[module.layer_idx] if layer_types else "full_attention"
    full = layer_type == "full_attention"
    pos = kwargs["position_ids"].expand(b, n)
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", getattr(rotary, "inv_freq", None))
    scaling_factor = getattr(rotary, f"{layer_type}_attention_scaling", getattr(rotary, "attention_scaling", 1.0))
    if full and ref.log_scale_base is not None:
        scale = torch.clamp(torch.log(pos.double() + 1) / math.log(ref.log_scale_base), min=1.0)
        q = q * scale[:, None, :, None]
    pq, pk = ref.positions(pos, full)
    groups = h // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    qr, q_partner, q_pass, cq, sq = _rotate_pairs(q, pq, inv_freq, scaling_factor)
    kr, k_partner, k_pass, ck, sk = _rotate_pairs(k, pk, inv_freq, scaling_factor)
    q_rot = qr.unsqueeze(3) * cq + q_partner.unsqueeze(3) * sq  # [B, H, i, j, rot]
    k_rot = kr.unsqueeze(2) * ck + k_partner.unsqueeze(2) * sk  # [B, H, i, j, rot]
    scores = (q_rot * k_rot).sum(-1) + q_pass @ k_pass.transpose(-1, -2)
    scores = scores * (scaling if scaling is not None else d**-0.5) + mask
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2), None


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _ids(batch: int = 2, n: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _left_padded(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _ids(3, SEQ, seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 7, 3]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def _assert_close(actual, expected, dtype, mask=None):
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), **tolerance(dtype))


# --------------------------------------------------------------------------------------------------------------------
# 1. Forward logits against the reference


@pytest.mark.parametrize("mode", list(MODES))
def test_logits_match_naive_reference(make_tiny_model, rope_arch, float_dtype, mode):
    model = make_tiny_model(rope_arch, dtype=float_dtype)
    ref = NaiveReRoPE(model, WINDOW, **MODES[mode])
    patch_rerope(model, WINDOW, **MODES[mode])
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids).logits, ref.model(ids).logits, float_dtype)


@pytest.mark.parametrize("arch", ["phi", "gpt_neox"])
@pytest.mark.parametrize("mode", ["rerope", "leaky-logn"])
def test_partial_rotary_matches_naive_reference(make_tiny_model, arch, mode):
    model = make_tiny_model(arch, dtype=torch.float64)
    ref = NaiveReRoPE(model, WINDOW, **MODES[mode])
    patch_rerope(model, WINDOW, **MODES[mode])
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids).logits, ref.model(ids).logits, torch.float64)


def test_eager_backend_and_left_padding_match_reference(make_tiny_model):
    model = make_tiny_model("llama", dtype=torch.float64, attn_implementation="eager")
    ref = NaiveReRoPE(model, WINDOW, **MODES["leaky-logn"])
    patch_rerope(model, WINDOW, **MODES["leaky-logn"])
    ids, mask = _left_padded()
    with torch.no_grad():
        _assert_close(model(ids, attention_mask=mask).logits, ref.model(ids, attention_mask=mask).logits,
                      torch.float64, mask)  # fmt: skip
    assert unpatch_rerope(model).config._attn_implementation == "eager"


def test_rope_scaling_of_raw_far_keys_matches_reference(make_tiny_model):
    """yarn scales cos/sin (attention_scaling != 1): ReRoPE's raw far keys must carry that scale too."""
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 512}
    model = make_tiny_model("llama", dtype=torch.float64, rope_parameters=rope)
    assert _rotary_module(model).attention_scaling != 1.0
    ref = NaiveReRoPE(model, WINDOW, leaky=None, log_scale_base=None)
    patch_rerope(model, WINDOW)
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids).logits, ref.model(ids).logits, torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# 2. window >= sequence length is the unpatched model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3", "gpt_neox"])
def test_window_at_least_length_equals_unpatched(make_tiny_model, arch):
    model = make_tiny_model(arch, dtype=torch.float64)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        patch_rerope(model, SEQ)
        after = model(ids).logits
    _assert_close(after, before, torch.float64)


@pytest.mark.parametrize("n", [1, 3])
def test_inputs_shorter_than_the_window_equal_unpatched(make_tiny_model, n):
    model = make_tiny_model("qwen2", dtype=torch.float64)
    ids = _ids(2, n)
    with torch.no_grad():
        before = model(ids).logits
        patch_rerope(model, WINDOW, leaky=LEAKY)
        _assert_close(model(ids).logits, before, torch.float64)


def test_bfloat16_model_runs_close_to_the_reference(make_tiny_model):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    ref = NaiveReRoPE(model, WINDOW, **MODES["rerope-logn"])
    patch_rerope(model, WINDOW, **MODES["rerope-logn"])
    ids = _ids()
    with torch.no_grad():
        out = model(ids).logits
        torch.testing.assert_close(out.double(), ref.model(ids).logits, rtol=0, atol=3e-2)
        out = model(ids[:, :9], use_cache=True)  # and decoding runs in bf16 too
        out = model(ids[:, 9:10], cache=out.past_key_values, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


# --------------------------------------------------------------------------------------------------------------------
# 3. Incremental decoding and left-padded batched generation


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi"])
@pytest.mark.parametrize("mode", ["rerope", "leaky-logn"])
def test_incremental_decoding_equals_full_recomputation(make_tiny_model, arch, mode):
    model = patch_rerope(make_tiny_model(arch, dtype=torch.float64), WINDOW, **MODES[mode])
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :9], use_cache=True)
        _assert_close(out.logits, full[:, :9], torch.float64)
        cache = out.past_key_values
        out = model(ids[:, 9:14], cache=cache, use_cache=True)  # a chunk continuing the cache
        _assert_close(out.logits, full[:, 9:14], torch.float64)
        for t in range(14, SEQ):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            _assert_close(out.logits[:, 0], full[:, t], torch.float64)


@pytest.mark.parametrize("mode", ["rerope", "leaky-logn"])
def test_decoding_reuses_rotated_keys_only_while_the_cache_holds_them(make_tiny_model, monkeypatch, mode):
    """Steady decoding rotates only the newest near / far key per layer (earlier rotations are kept), and after
    cropping, reordering the batch or a step of the inner model (no hooks) nothing stale is reused: every step
    matches the float64 reference (also across blocks of precomputed row rotations); the kept rotations go away
    with the cache."""
    import gc

    from hf_su.modeling import rerope

    model = make_tiny_model("llama", dtype=torch.float64)
    ref = NaiveReRoPE(model, WINDOW, **MODES[mode])
    patch_rerope(model, WINDOW, **MODES[mode])
    rotated_counts = []
    rotate_keys = rerope._Tables.rotate_keys

    def counting(self, key, kind, start, end):
        rotated_counts.append(end - start)
        return rotate_keys(self, key, kind, start, end)

    monkeypatch.setattr(rerope._Tables, "rotate_keys", counting)
    # rotation matrices for 3 positions per block (2 rows, fp64, head_dim 16): decoding crosses block boundaries
    monkeypatch.setattr(rerope, "_ROTATION_BLOCK_BYTES", 3 * 2 * 3 * 16 * 16 * 8)
    ids, other = _ids(2, SEQ), _ids(2, SEQ, seed=7)

    def step(cache, seq, through=model):
        rotated_counts.clear()
        logits = through(seq[:, -1:], cache=cache, use_cache=True)
        if through is model:
            _assert_close(logits.logits[:, -1], ref.model(seq).logits[:, -1], torch.float64)
        return max(rotated_counts)

    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True).past_key_values
        assert step(cache, ids[:, :9]) > 1  # the first decoding step rotates from scratch
        assert all(step(cache, ids[:, : t + 1]) == 1 for t in range(9, 15))
        cache.crop(-3)  # back to 12 tokens, then other tokens: the kept prefix is reused
        seq = torch.cat([ids[:, :12], other[:, 12:]], dim=1)
        assert all(step(cache, seq[:, : t + 1]) == 1 for t in range(12, 15))
        cache.reorder_cache(torch.tensor([1, 0]))  # beams reordered: rotate from scratch
        seq = seq.flip(0)
        assert step(cache, seq[:, :16]) > 1
        step(cache, seq[:, :17], through=model.model)  # no hooks: nothing kept, nothing reused
        assert step(cache, seq[:, :18]) > 1
        assert all(step(cache, seq[:, : t + 1]) == 1 for t in range(18, SEQ))
    decoding = model.model.layers[0].self_attn._hf_su_rerope.decoding
    assert len(decoding.rotated) == 1
    del cache
    gc.collect()
    assert len(decoding.rotated) == 0


def test_generate_under_inference_mode_equals_no_grad(make_tiny_model):
    """Inference tensors carry no version counter: the patch must still run (and give the same tokens)."""
    model = patch_rerope(make_tiny_model("llama", dtype=torch.float64), WINDOW, leaky=LEAKY)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(_ids(2, 9), **kwargs)
    with torch.inference_mode():
        out = model.generate(_ids(2, 9), **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    for a, b in zip(out.logits, expected.logits):
        _assert_close(a, b, torch.float64)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padded_batched_generate_equals_per_sequence(make_tiny_model, arch):
    model = patch_rerope(make_tiny_model(arch, dtype=torch.float64), WINDOW, leaky=LEAKY, log_scale_base=LOG_BASE)
    ids, mask = _left_padded()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)
        for row in range(ids.shape[0]):
            prompt = ids[row : row + 1, mask[row].bool()]
            single = model.generate(prompt, **kwargs)
            assert torch.equal(batched.sequences[row, ids.shape[1] :], single.sequences[0, prompt.shape[1] :])
            for step_b, step_s in zip(batched.logits, single.logits):
                _assert_close(step_b[row], step_s[0], torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# 4. Gradients


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["rerope", "leaky-logn"])
def test_gradients_match_reference(make_tiny_model, arch, mode):
    model = make_tiny_model(arch, dtype=torch.float64)
    ref = NaiveReRoPE(model, WINDOW, **MODES[mode])
    patch_rerope(model, WINDOW, **MODES[mode])
    ids = _ids()
    for m in (model, ref.model):
        m.train()
        m(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# 5. unpatch and persistence


def test_unpatch_restores_bit_identical_outputs(make_tiny_model):
    model = make_tiny_model("qwen3")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        patch_rerope(model, WINDOW, leaky=LEAKY)
        patched = model(ids).logits
        unpatch_rerope(model)
        after = model(ids).logits
    assert not torch.allclose(patched, before)
    assert torch.equal(after, before)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "rerope")
    with pytest.raises(ValueError, match="not patched"):
        unpatch_rerope(model)


def test_save_load_patch_restores_outputs(make_tiny_model, tmp_path):
    model = patch_rerope(make_tiny_model("gemma3"), WINDOW, leaky=LEAKY, log_scale_base=LOG_BASE)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.config.rerope == {"window": WINDOW, "leaky": LEAKY, "log_scale_base": LOG_BASE}
    patch_rerope(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_repatch_same_settings_is_noop_and_different_settings_raise(make_tiny_model):
    model = patch_rerope(make_tiny_model("llama"), WINDOW)
    assert patch_rerope(model, WINDOW) is model
    with pytest.raises(ValueError, match="already patched"):
        patch_rerope(model, WINDOW, leaky=LEAKY)
    unpatch_rerope(model)
    assert model.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------------------------
# 6. Packed sequences and other refusals


def test_packed_sequences_are_refused(make_tiny_model):
    model = patch_rerope(make_tiny_model("llama"), WINDOW)
    ids = _ids(1)
    positions = torch.cat([torch.arange(10), torch.arange(SEQ - 10)]).unsqueeze(0)
    with pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=positions)


@pytest.mark.parametrize(
    ("arch", "match"), [("gpt2", "no rotary embedding"), ("falcon", "cannot replace its attention")]
)
def test_unsupported_architectures_are_refused(make_tiny_model, arch, match):
    with pytest.raises(ValueError, match=match):
        patch_rerope(make_tiny_model(arch), WINDOW)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(window=0), "window must be"),
        (dict(window=2.5), "window must be"),
        (dict(window=8, leaky=1.0), "leaky must be"),
        (dict(window=8, leaky=0.5), "leaky must be"),
        (dict(window=8, log_scale_base=1), "log_scale_base must be"),
    ],
)
def test_invalid_settings_are_refused(make_tiny_model, kwargs, match):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        patch_rerope(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_dynamic_rope_and_static_cache_are_refused(make_tiny_model):
    dynamic = make_tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        patch_rerope(dynamic, WINDOW)
    model = patch_rerope(make_tiny_model("llama"), WINDOW)
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(_ids(1, 8), max_new_tokens=2, do_sample=False, cache_implementation="static")


# --------------------------------------------------------------------------------------------------------------------
# Contract with hybrid window/full models (HWFA): only full layers get ReRoPE, other layers keep their backend


def test_hybrid_layers_keep_their_previous_custom_backend(make_tiny_model):
    calls = []

    def window_backend(module, q, k, v, mask, **kwargs):
        calls.append((module.layer_idx, kwargs.get("sliding_window")))
        return ALL_ATTENTION_FUNCTIONS_SDPA(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("hf_su_test_window", window_backend)
    AttentionMaskInterface.register("hf_su_test_window", sdpa_mask)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    model = make_tiny_model(
        "qwen2", dtype=torch.float64, num_hidden_layers=3, layer_types=layer_types, sliding_window=6,
        use_sliding_window=True, max_window_layers=0,
    )  # fmt: skip
    model.set_attn_implementation("hf_su_test_window")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        ref = NaiveReRoPE(model, WINDOW, **MODES["rerope-logn"])
        patch_rerope(model, WINDOW, **MODES["rerope-logn"])
        calls.clear()
        patched = model(ids).logits
        assert calls == [(0, 6), (2, 6)]
        _assert_close(patched, ref.model(ids).logits, torch.float64)
        unpatch_rerope(model)
        assert model.config._attn_implementation == "hf_su_test_window"
        assert torch.equal(model(ids).logits, before)


def ALL_ATTENTION_FUNCTIONS_SDPA(*args, **kwargs):  # noqa: N802 - the registry entry, looked up when called
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def test_mask_interface_of_previous_backend_is_reused(make_tiny_model):
    model = patch_rerope(make_tiny_model("llama", attn_implementation="eager"), WINDOW)
    name = model.config._attn_implementation
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is eager_mask
