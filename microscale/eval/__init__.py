"""Accuracy evaluation: perplexity on held-out text, quantized-vs-reference comparisons."""
