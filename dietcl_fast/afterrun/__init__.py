"""After the run: classify images with a run's model (`predict`), write it for other tools
(`export`: safetensors + timm's config.json), and summarise the run (`show`).
docs/after-the-run.md describes the commands and the files."""
from .run import RunError, RunModel, check_run_dir, open_run, read_results, read_state

__all__ = ["RunError", "RunModel", "check_run_dir", "open_run", "read_results", "read_state"]
