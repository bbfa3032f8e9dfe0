"""Execute the study notebooks headless with papermill, and strip volatile metadata from the results."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["NOTEBOOK_DIR", "notebooks", "parameter_defaults", "run_notebooks", "strip_volatile"]

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebooks(names=None) -> list[Path]:
    """The numbered notebooks (``NN_*.ipynb``) in order, or those whose number/name is in ``names``."""
    found = sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) under {NOTEBOOK_DIR}")
    if names:
        wanted = {str(n) for n in names}
        found = [p for p in found if p.stem in wanted or p.stem[:2] in wanted]
        if not found:
            raise ValueError(f"no notebook matches {sorted(wanted)}; have {[p.stem for p in notebooks()]}")
    return found


def parameter_defaults(path: Path) -> dict:
    """{name: value} of the literal assignments in a notebook's cell tagged ``parameters``."""
    import ast

    nb = json.loads(Path(path).read_text())
    cell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{Path(path).name} has no cell tagged 'parameters'")
    out = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def strip_volatile(path: Path) -> None:
    """Remove timestamps and durations so a re-render changes only what the run changed."""
    nb = json.loads(Path(path).read_text())
    nb.get("metadata", {}).pop("papermill", None)
    nb["metadata"].get("widgets", None) and nb["metadata"].pop("widgets")
    for cell in nb.get("cells", []):
        md = cell.get("metadata", {})
        md.pop("execution", None)
        md.pop("papermill", None)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def run_notebooks(names=None, out_dir: str | Path | None = None, parameters: dict | None = None,
                  progress: bool = True) -> list[Path]:
    """Execute notebooks with papermill (cwd = notebooks/) into ``out_dir`` (default: in place).

    ``parameters`` are injected into each notebook's ``parameters`` cell where the notebook declares them.
    Returns the executed notebook paths.
    """
    import papermill as pm

    # the kernel must be this interpreter (the venv's), whatever is first on PATH
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TQDM_MININTERVAL", "15")  # progress bars in the saved outputs, but few updates
    out = Path(out_dir) if out_dir else NOTEBOOK_DIR
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for nb in notebooks(names):
        params = dict(parameters or {})
        target = out / nb.name
        t0 = time.perf_counter()
        print(f"kvlab study: executing {nb.name} {params or ''}", file=sys.stderr, flush=True)
        pm.execute_notebook(str(nb), str(target), parameters=params, cwd=str(NOTEBOOK_DIR),
                            kernel_name="python3", progress_bar=progress, log_output=False)
        strip_volatile(target)
        print(f"kvlab study: {nb.name} done in {time.perf_counter() - t0:.0f} s -> {target}", file=sys.stderr)
        done.append(target)
    return done
