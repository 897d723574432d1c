"""sftlab: supervised fine-tuning of causal language models with TRL, that tells you whether it worked.

The library runs the same steps as the command line:

    from sftlab import load_config, check, train
    cfg = load_config("sftlab.yaml", overrides=["training.max_steps=20"])
    audit = check(cfg)          # `sftlab check`
    result = train(cfg)         # `sftlab train`
    export_run(result.run_dir, format="gguf")  # `sftlab export`
"""

import importlib

__version__ = "0.1.0"

# Names are imported on first use, so `sftlab --help` does not wait for torch and transformers.
_EXPORTS = {
    "SftlabConfig": "sftlab.config",
    "load_config": "sftlab.config",
    "validate_config": "sftlab.config",
    "write_starter_config": "sftlab.config",
    "UserError": "sftlab.errors",
    "ConfigError": "sftlab.errors",
    "DataError": "sftlab.errors",
    "ModelError": "sftlab.errors",
    "check": "sftlab.train",
    "train": "sftlab.train",
    "TrainResult": "sftlab.train",
    "evaluate_run": "sftlab.evaluate",
    "evaluate_model_path": "sftlab.evaluate",
    "run_demo": "sftlab.demo",
    "export_run": "sftlab.export",
    "ExportResult": "sftlab.export",
    "write_report": "sftlab.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sftlab' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
