"""MLflow pyfunc model for a transformers checkpoint folder (logged as "models from code").

MLflow's transformers flavour fails with transformers 5 when given a checkpoint path, so
mergeme logs checkpoints as a pyfunc whose single artifact, ``checkpoint``, is the folder.
``predict`` takes a DataFrame with a ``prompt`` column and returns greedy continuations.
A checkpoint of one of mergeme's own model classes is logged with the mergeme package as
MLflow ``code`` (on ``sys.path`` when the model loads), so it serves where mergeme is not
installed. This folder is not a Python package on purpose: it would shadow the real ``mlflow``.
"""

import pandas as pd

import mlflow


def _register_model_type(folder: str) -> None:
    """Make the checkpoint's model_type loadable: transformers' own types need nothing;
    mergeme's own classes come from the mergeme package logged with the model (``code``).

    Raises:
        RuntimeError: the model_type is neither a transformers one nor importable from mergeme.
    """
    import json
    from pathlib import Path

    from transformers import CONFIG_MAPPING

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    try:  # registers mergeme's own model classes with the Auto classes
        import mergeme.models  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"checkpoint model_type {model_type!r} is not a transformers model type and the "
            f"mergeme package that defines it cannot be imported ({exc}); log the model with "
            "mergeme's log_checkpoint_model (it ships the code) or install mergeme"
        ) from exc
    if model_type not in CONFIG_MAPPING:
        raise RuntimeError(
            f"checkpoint model_type {model_type!r} is neither a transformers model type nor one "
            "of mergeme's own model classes; check config.json of the logged checkpoint"
        )


class CheckpointModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts["checkpoint"]
        _register_model_type(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=False
        ).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        import torch

        max_new_tokens = int((params or {}).get("max_new_tokens", 16))
        prompts = list(pd.DataFrame(model_input)["prompt"])
        outputs = []
        for prompt in prompts:
            encoded = self.tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                generated = self.model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            new_tokens = generated[0, encoded["input_ids"].shape[1] :]
            outputs.append(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        return outputs


mlflow.models.set_model(CheckpointModel())
