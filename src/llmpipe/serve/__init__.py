"""The OpenAI-compatible server and its comparison page (python -m llmpipe.serve)."""
