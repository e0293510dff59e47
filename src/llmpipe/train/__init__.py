"""Training: pretraining the from-scratch GPT, finetuning and LoRA through the Trainer."""
