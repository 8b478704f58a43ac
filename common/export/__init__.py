"""Export: merge an adapter into the original base weights, write GGUF (model or LoRA
adapter) and an Ollama Modelfile, and verify the result in llama.cpp.

Modules: ``st_io`` (safetensors on numpy, bf16-safe), ``merge`` (LoRA/rsLoRA/DoRA
formula, streamed), ``merge_cmd`` (``llm-ft merge``), ``arch`` (architecture table),
``tokenizer`` (GGUF vocabulary), ``gguf_file`` (writer and quantization), ``lora_gguf``
(adapter GGUF), ``modelfile`` (Ollama Modelfile), ``verify`` (llama.cpp checks),
``cmd`` (``llm-ft export``).
"""
