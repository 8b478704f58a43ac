"""``llm-ft push``: publish a run to the Hugging Face Hub (staging, model card, upload)."""
