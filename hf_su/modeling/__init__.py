"""Attention and sequence-model patches (ReRoPE, HWFA, DEER)."""
