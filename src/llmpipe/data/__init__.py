"""Data: the corpus's download and reading, tokenizers, token files, prompt formats."""
