"""Run the notebook example on the bundled kang18 data and write docs/notebook.md: each code block
followed by what it really printed (stdout and stderr, as a notebook shows them).

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python scripts/make_notebook_doc.py

Run from the repository root; it takes a few minutes on one core and writes runs/notebook_kang18.
"""

from __future__ import annotations

import contextlib
import io
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The example, one notebook cell per string.
CELLS = [
    '''import warnings

import anndata as ad
import perturbdiff as pdiff

warnings.filterwarnings("ignore", message="Moving element from .uns")  # the bundled file's old layout
adata = ad.read_h5ad("../shared/data/kang18_pbmc_ifnb.h5ad")   # bundled: Kang et al. 2018, IFN-beta
print(adata)''',
    '''model = pdiff.PerturbDiff(
    adata, perturbation_key="condition", control_label="control", cell_type_key="cell_type",
    split={"kind": "holdout_cell_type", "holdout": ["CD14+Mono"], "val_fraction": 0.2},
    **{"data.n_genes": 1000, "data.set_size": 128, "model.ema_decay": 0.99,
       "train.steps": 200, "train.lr": 1e-3, "train.warmup_steps": 20, "train.context_drop_prob": 0.2,
       "train.val_every": 100, "sample.populations": 1},
)
log = model.train()            # a progress bar; Ctrl-C saves a checkpoint, train() again resumes
print(log.tail(3))''',
    '''log = model.train(steps=300)   # 100 more steps: resumes from the checkpoint of step 200
print(model)''',
    '''pred = model.predict()         # the held-out CD14+Mono cells, predicted from their control cells
print(pred)
print(pred.obs.condition.value_counts())''',
    '''metrics = pdiff.evaluate(pred, adata)     # against the real cells, like metrics.csv
means = metrics[metrics.condition == "__all__"].set_index("metric").value
print(means[["pearson_delta", "mse", "de_direction_match", "de_nsig_counts_pred", "de_nsig_counts_real", "mmd2_energy"]])''',
    '''table = model.evaluate()       # as perturbdiff run: the baselines too, metrics.csv and report.html
wide = table[table.condition == "__all__"].pivot(index="metric", columns="method", values="value")
print(wide.loc[["pearson_delta", "mse", "mmd2_energy"], ["model", "control", "context_mean", "random_train"]])
print(model.report)''',
    '''saved = model.save("runs/notebook_kang18")
again = pdiff.PerturbDiff.load(saved, adata)   # the data it was trained on, held in memory
print(again)''',
]


def main() -> None:
    shutil.rmtree(ROOT / "runs" / "notebook_kang18", ignore_errors=True)
    namespace: dict[str, object] = {}
    parts = [
        "# perturbdiff in a notebook",
        "",
        "`import perturbdiff as pdiff` offers the command line's train, predict and evaluate on an AnnData in",
        "memory; the same configuration and seed give the same numbers as `perturbdiff run`",
        "(`tests/test_api.py`). Options are config keys ([config.md](config.md)), dotted as `--set` takes",
        "them (`**{\"train.steps\": 500}`) or nested (`train={\"steps\": 500}`); `config=` takes a YAML file",
        "as a base. The model lives in a run folder ([run_folder.md](run_folder.md)): a temporary one until",
        "`save(DIR)` (which moves it there and removes the temporary folder; an unsaved model's folder goes",
        "when the model does), or `run_dir=DIR`.",
        "",
        "Below, each cell was run in order from the repository root, and its output pasted under it by",
        "`scripts/make_notebook_doc.py` (a notebook shows stderr, where the progress lines go, the same way).",
        "300 steps are far too few for a good model (the README's results train 1000); they keep this",
        "page quick to regenerate.",
        "",
    ]
    started = time.monotonic()
    for cell in CELLS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            exec(compile(cell, "<cell>", "exec"), namespace)
        parts += ["```python", cell, "```", "", "```text", out.getvalue().rstrip(), "```", ""]
    minutes = (time.monotonic() - started) / 60
    parts += [
        f"All cells together took {minutes:.1f} minutes on {platform.machine()} with one torch thread "
        f"(`OMP_NUM_THREADS=1`), on a machine shared with other jobs.",
        "",
    ]
    (ROOT / "docs" / "notebook.md").write_text("\n".join(parts))
    print("wrote docs/notebook.md")


if __name__ == "__main__":
    main()
