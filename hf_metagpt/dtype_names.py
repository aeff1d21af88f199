"""The dtype names a config.json (`dtype` / `torch_dtype`), `--dtype` and a recipe use, and the
safetensors codes they stand for (a leaf module: no torch, so validating options needs none)."""

CONFIG_TO_ST: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ST_TO_CONFIG: dict[str, str] = {v: k for k, v in CONFIG_TO_ST.items()}
