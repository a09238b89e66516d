"""Load a logged checkpoint model where mergeme cannot be imported, and generate from it.

Run as ``python -I -S clean_load.py SITE_PACKAGES MODEL_DIR PROMPT``: no site processing, so
the editable install of mergeme (a ``.pth`` hook) is not on the path; only the libraries in
SITE_PACKAGES are. Prints one JSON line: where mergeme was imported from, and the answer or
the error.
"""

import importlib.util
import json
import sys

site_packages, model_dir, prompt = sys.argv[1:4]
sys.path.append(site_packages)
result = {"importable_before": importlib.util.find_spec("mergeme") is not None}

import mlflow  # noqa: E402

try:
    model = mlflow.pyfunc.load_model(model_dir)
    [result["answer"]] = model.predict({"prompt": [prompt]}, params={"max_new_tokens": 6})
except Exception as exc:  # the test reads the message
    result["error"] = f"{type(exc).__name__}: {exc}"
module = sys.modules.get("mergeme")
result["mergeme_file"] = getattr(module, "__file__", None)
print(json.dumps(result))
