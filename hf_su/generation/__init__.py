"""Generation helpers (continuation fix for prompts that end inside a token)."""
