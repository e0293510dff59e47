"""Exporting a trained model for inference: int8 quantization."""
