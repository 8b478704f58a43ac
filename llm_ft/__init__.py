"""llm-ft's Python API: fine-tune a chat model with LoRA, evaluate, merge, export to GGUF, publish.

    import llm_ft
    run = llm_ft.train(model="default", data="data", max_steps=50, out="runs/intent")
    print(llm_ft.evaluate(run.run_dir)["intent_accuracy"])
    llm_ft.export(run.run_dir)

Every function takes the command's options as keyword arguments (``--max-seq-length``
is ``max_seq_length``), validates them as the command does and raises
:class:`LLMFTError` with the command's message.
"""

from common import __version__
from common.errors import UserError as LLMFTError
from llm_ft.api import build_config, chat, check_data, classify, evaluate, export, merge, push, train
from llm_ft.results import ClassifyResult, EvalResult, PushResult, TrainResult

__all__ = ["LLMFTError", "ClassifyResult", "EvalResult", "ExportResult", "PushResult", "TrainResult", "__version__",
           "build_config", "chat", "check_data", "classify", "evaluate", "export", "merge", "push", "train"]


def __getattr__(name: str):
    if name == "ExportResult":  # lazily: see llm_ft.results
        from llm_ft import results

        return results.ExportResult
    raise AttributeError(f"module 'llm_ft' has no attribute {name!r}")
