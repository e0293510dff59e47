"""Models: GPT-2 written from scratch (gpt, loss), its conversion to and from Hugging Face (hf),
loading Hugging Face models (loading), measuring and timing them (measure is in
llmpipe.evaluation), and the compiled greedy decoder (decoding)."""
