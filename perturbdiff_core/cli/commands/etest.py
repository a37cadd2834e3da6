"""``perturbdiff etest``: kernel two-sample test of every perturbation against its control cells.

For each perturbation (within each group of ``--group-by``, against the control cells of that
group) it reports MMD^2, a permutation p-value (:func:`perturbdiff_core.mmd.two_sample.permutation_test`)
and a Benjamini-Hochberg adjusted p-value over all rows.

Relation to scperturb's E-test (Peidli et al. 2024), checked in ``tests/test_etest.py``:
``--kernel energy --estimator unbiased`` (beta=1) gives exactly scperturb's E-distance
``scperturb.edist(adata, obsm_key=..., dist="euclidean")`` on the same matrix. scperturb's
default ``dist="sqeuclidean"`` (with its default ``sample_correct=True``) is
``--kernel energy --kernel-param beta=2 --estimator unbiased``: the unbiased estimate of
``2 ||mean_x - mean_y||^2``; with ``sample_correct=False`` it is ``--estimator biased``, exactly
``2 ||mean_x - mean_y||^2``. scperturb usually runs on PCA coordinates; this command uses X.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ...configuration import parse_overrides
from ...errors import ConfigError
from ...io import atomic_path, check_output_file

if TYPE_CHECKING:  # the data stack and torch are imported when the command runs, not for --help
    from collections.abc import Iterable

    import pandas as pd
    from rich.console import Console

_EPILOG = """\
Rows: one per perturbation (per group with --group-by; the group column is 'all' without it);
n_cells and n_control count the cells used (after --max-cells). A perturbation with fewer than
2 cells, or a group with fewer than 2 control cells, is left out with a warning on stderr.
Kernels with a 'lengthscale' parameter use the median heuristic unless --kernel-param
lengthscale=... is given. Each row gets its own random stream derived from --seed, the group
and the perturbation, so a row does not depend on the others.

scperturb: --kernel energy --estimator unbiased equals scperturb.edist(..., dist='euclidean')
on the same matrix; scperturb's default dist='sqeuclidean' equals --kernel energy
--kernel-param beta=2 --estimator unbiased (unbiased estimate of 2 ||mean_x - mean_y||^2;
--estimator biased gives exactly 2 ||mean_x - mean_y||^2, scperturb's sample_correct=False).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff etest``."""
    parser = subparsers.add_parser(
        "etest",
        help="permutation MMD test of each perturbation against control cells",
        description=(
            "Kernel two-sample test of every perturbation against the control cells: MMD^2, a\n"
            "permutation p-value (1 + #{permuted >= observed}) / (1 + permutations) and a\n"
            "Benjamini-Hochberg adjusted p-value over all rows."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA.h5ad", help="AnnData file; X holds the expression matrix")
    parser.add_argument("--perturbation-key", default="perturbation", help="obs column of perturbation labels (default: %(default)s)")
    parser.add_argument("--control", default="control", help="label of control cells in that column (default: %(default)s)")
    parser.add_argument("--group-by", default=None, help="obs column (e.g. cell_type) to test within; controls come from the same group")
    parser.add_argument("--kernel", default="rbf", help="perturbdiff.kernels plug-in name (default: %(default)s; see 'perturbdiff plugins')")
    parser.add_argument(
        "--kernel-param", action="append", default=[], metavar="KEY=VALUE", help="kernel parameter, VALUE parsed as YAML; repeatable (e.g. beta=2)"
    )
    parser.add_argument("--estimator", default="unbiased", help="perturbdiff.estimators plug-in name (default: %(default)s)")
    parser.add_argument("--estimator-param", action="append", default=[], metavar="KEY=VALUE", help="estimator parameter, VALUE parsed as YAML; repeatable")
    parser.add_argument("--permutations", type=int, default=1000, help="permutations per test (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--max-cells", type=int, default=None, metavar="N", help="subsample each perturbation and control set to at most N cells")
    parser.add_argument("--out", default=None, metavar="results.csv", help="write the table as CSV (atomically)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the tests, print the table sorted by MMD^2, and write the CSV if asked."""
    from rich.console import Console

    from ...data.anndata_io import read_anndata
    from ...mmd.estimators import as_estimator
    from ...mmd.etest import MIN_CELLS, Comparison, build_kernel, etest
    from ...progress import progress_bar

    if args.max_cells is not None and args.max_cells < MIN_CELLS:
        raise ConfigError(f"--max-cells must be at least {MIN_CELLS}, got {args.max_cells}.")
    if args.permutations < 1:
        raise ConfigError(f"--permutations must be a positive integer, got {args.permutations}.")
    if args.seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {args.seed}.")
    if args.out is not None:
        check_output_file(args.out)  # a folder or an unwritable place fails now, not after the tests
    kernel_params = parse_overrides(args.kernel_param, flag="--kernel-param")
    kernel = build_kernel(args.kernel, kernel_params)
    estimator = as_estimator(args.estimator, **parse_overrides(args.estimator_param, flag="--estimator-param"))
    adata = read_anndata(args.data)

    err = Console(stderr=True)

    def progress(items: Iterable[Comparison]) -> Iterable[Comparison]:
        return progress_bar(items, desc="E-test", unit="tests")

    table, skipped = etest(
        adata,
        perturbation_key=args.perturbation_key,
        control=args.control,
        group_by=args.group_by,
        kernel=kernel,
        estimator=estimator,
        permutations=args.permutations,
        seed=args.seed,
        max_cells=args.max_cells,
        progress=progress,
    )
    for message in skipped:
        err.print(f"perturbdiff: warning: {message}", markup=False, highlight=False)
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
    _print_table(table, Console())
    if args.out is not None:
        err.print(f"Wrote {len(table)} rows to {args.out}", markup=False, highlight=False)
    return 0


def _print_table(table: pd.DataFrame, console: Console) -> None:
    """The results as a rich table, largest MMD^2 first."""
    from rich import box
    from rich.table import Table

    from ...mmd.etest import COLUMNS

    shown = Table(title="E-test (MMD^2 against control)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in COLUMNS:
        text = column in ("perturbation", "group")
        shown.add_column(column, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for row in table.sort_values("mmd2", ascending=False).itertuples(index=False):
        shown.add_row(
            row.perturbation, row.group, str(row.n_cells), str(row.n_control),
            f"{row.mmd2:.4g}", f"{row.pvalue:.3g}", f"{row.pvalue_adj:.3g}",
        )
    console.print(shown)
