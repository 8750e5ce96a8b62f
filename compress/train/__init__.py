"""Recovery training (full or LoRA, HF Trainer) and the multi-process helpers it runs under."""
