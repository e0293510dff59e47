"""GPT-2 model, written from scratch, and conversion to/from Hugging Face."""

from llmpipe.model.gpt import GPT, GPTConfig, measure_matmul_peak_flops
from llmpipe.model.hf import export_hf_gpt2, load_hf_gpt2

__all__ = ["GPTConfig", "GPT", "load_hf_gpt2", "export_hf_gpt2", "measure_matmul_peak_flops"]
