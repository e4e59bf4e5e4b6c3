"""BytePiece tokenizer adapter, trainer and Viterbi sampling."""
