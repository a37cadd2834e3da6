"""The ``perturbdiff`` command line: discovery, version, and one-line errors for bad input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import pytest
from test_etest import make_screen

from perturbdiff_core import __version__
from perturbdiff_core.cli import DEBUG_ENV, main, positionals_before_overrides
from perturbdiff_core.cli.commands import plugins
from perturbdiff_core.configuration import parse_overrides
from perturbdiff_core.errors import ConfigError, DataError, PerturbDiffNote, PerturbDiffWarning


@pytest.fixture(scope="module")
def screen_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "screen.h5ad"
    make_screen().write_h5ad(path)
    return path


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 2 and exactly one stderr line naming the problem and the fix, no traceback."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("perturbdiff: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"perturbdiff {__version__}"


def test_help_lists_discovered_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "etest" in out and "plugins" in out and DEBUG_ENV in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_plugins_lists_groups_and_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for expected in ("perturbdiff.kernels", "perturbdiff.estimators", "rbf", "energy", "unbiased", "perturbdiff"):
        assert expected in out


def test_plugins_prints_plain_text_and_no_keops_note() -> None:
    """In a fresh process, where importing GPyTorch (which imports pykeops) would print KeOps' CUDA note."""
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "perturbdiff_core", "plugins"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "[KeOps]" not in done.stdout + done.stderr and "CUDA libraries" not in done.stdout + done.stderr
    for markup in (":math:", "``", "\\|", "\\beta", ":class:"):
        assert markup not in done.stdout, markup
    assert "k(x, y) = -‖x - y‖^β, 0 < β ≤ 2" in done.stdout  # the energy kernel's formula, readable


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--perturbation-key", "guide"], ["obs has no column 'guide'", "cell_type", "Pass the right column name"]),
        (["--group-by", "tissue"], ["obs has no column 'tissue'", "group-by key"]),
        (["--control", "ctrl"], ["Control label 'ctrl' not found", "values found: control, none, shift"]),
        (["--kernel", "rbff"], ["No plug-in named 'rbff'", "rbf", "energy", "Check the spelling"]),
        (["--estimator", "unbaised"], ["No plug-in named 'unbaised'", "unbiased"]),
        (["--kernel", "energy", "--kernel-param", "gamma=2"], ["does not accept", "beta"]),
        (["--kernel-param", "beta"], ["--kernel-param expects key=value"]),
        (["--max-cells", "1"], ["--max-cells must be at least 2"]),
        (["--seed", "-1"], ["--seed must be a non-negative integer"]),
    ],
)
def test_bad_input_is_one_line(screen_file: Path, args: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["etest", str(screen_file), "--permutations", "9", *args])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_a_config_named_after_set_pairs_is_the_config() -> None:
    assert positionals_before_overrides(["run", "--set", "a=1", "b=2", "c.yaml", "--out", "x"]) == [
        "run", "c.yaml", "--set", "a=1", "b=2", "--out", "x"
    ]
    unchanged = ["suite", "s.yml", "--set", "a=1", "--jobs", "2"]
    assert positionals_before_overrides(unchanged) == unchanged
    assert positionals_before_overrides(["run", "c.yaml", "--set", "k", "=", "1"])[-3:] == ["k", "=", "1"]


def test_spaces_around_the_equals_sign_of_set_are_named() -> None:
    with pytest.raises(ConfigError, match=r"got 'train.steps' \(no spaces around '=': train.steps=60\)"):
        parse_overrides(["train.steps", "=", "60"])
    with pytest.raises(ConfigError, match=r"\(no spaces around '=': train.steps=60\)"):
        parse_overrides(["train.steps", "=60"])


def test_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["etest", str(tmp_path / "missing.h5ad")])
    assert_one_line_error(code, capsys.readouterr().err, "No such file", "missing.h5ad", "Give the path")


def _not_anndata(path: Path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f["a"] = [1, 2, 3]


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (_not_anndata, ["is not an AnnData file", "write_h5ad"]),
        (lambda p: ad.AnnData(obs=make_screen().obs, var=make_screen().var).write_h5ad(p), ["no X matrix"]),
        (lambda p: make_screen()[:, :0].copy().write_h5ad(p), ["no genes"]),
        (lambda p: make_screen()[:0].copy().write_h5ad(p), ["no cells"]),
        (lambda p: p.mkdir(), ["is a folder, not an .h5ad file"]),
    ],
    ids=["hdf5-not-anndata", "no-x", "no-genes", "no-cells", "folder"],
)
def test_unusable_files_are_one_line(tmp_path: Path, make, fragments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data.h5ad"
    make(path)
    code = main(["etest", str(path), "--permutations", "9"])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_perturbdiff_warnings_print_as_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def warns(args):
        warnings.warn("3 conditions are left out:\n A, B, C.", PerturbDiffWarning, stacklevel=1)
        warnings.warn("took over a stale lock.", PerturbDiffNote, stacklevel=1)
        return 0

    monkeypatch.setattr(plugins, "run", warns)
    assert main(["plugins"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "perturbdiff: warning: 3 conditions are left out: A, B, C.",
        "perturbdiff: note: took over a stale lock.",
    ]


def test_a_file_system_error_no_command_caught_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(args):
        raise OSError(errno.ENOSPC, "Unable to write (errno = 28, time = ..., buf = ...)", "/data/out.h5ad")

    monkeypatch.setattr(plugins, "run", fails)
    assert_one_line_error(main(["plugins"]), capsys.readouterr().err, "/data/out.h5ad: No space left on device; free space")


def test_sigterm_stops_a_command_like_ctrl_c_with_status_143(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(plugins, "run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["plugins"]) == 143
    assert capsys.readouterr().err.strip() == "perturbdiff: error: terminated"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_stops_a_command_started_with_sigint_ignored(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A background job of a script inherits SIGINT ignored; ``kill -INT`` must stop it as during training."""
    def interrupted(args):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT did not stop the command")

    monkeypatch.setattr(plugins, "run", interrupted)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["plugins"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the inherited disposition is put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.strip() == "perturbdiff: error: interrupted"


def test_debug_env_reraises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(DataError, match="No such file"):
        main(["etest", str(tmp_path / "missing.h5ad")])


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plugins, "run", interrupted)
    assert main(["plugins"]) == 130
    assert capsys.readouterr().err.strip() == "perturbdiff: error: interrupted"


def test_console_script_and_module(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("perturbdiff")
    if not script.exists():
        pytest.skip(f"console script not installed at {script}; run pip install -e .")
    env = {key: value for key, value in os.environ.items() if key != DEBUG_ENV}
    result = subprocess.run(
        [str(script), "etest", str(tmp_path / "missing.h5ad")], capture_output=True, text=True, env=env, timeout=120
    )
    assert_one_line_error(result.returncode, result.stderr, "No such file")
    result = subprocess.run(
        [sys.executable, "-m", "perturbdiff_core", "--version"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == f"perturbdiff {__version__}"
