"""MLflow pyfunc model for a transformers checkpoint folder (logged as "models from code").

MLflow's transformers flavour fails with transformers 5 when given a checkpoint path, so
mergeme logs checkpoints as a pyfunc whose single artifact, ``checkpoint``, is the folder.
``predict`` takes a DataFrame with a ``prompt`` column and returns greedy continuations.
This folder is not a Python package on purpose: it would shadow the real ``mlflow``.
"""

import pandas as pd

import mlflow


class CheckpointModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:  # registers mergeme's own model classes with the Auto classes, if installed
            import mergeme.models  # noqa: F401
        except ImportError:
            pass
        folder = context.artifacts["checkpoint"]
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
