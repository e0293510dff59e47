"""Measuring models: perplexity and bits per byte, timing, lm-eval tasks, the report card."""
