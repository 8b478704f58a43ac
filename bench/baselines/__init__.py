"""The named baselines: Hugging Face Trainer + peft (B0, the seeds' recipe; B1, the best HF setup) and mlx_lm.lora."""
