"""Issue 14, items 5 and 12: every bad-file class and bad argument through
``show``, ``run`` and ``compare``: one clear line naming the file (or the
argument) and the problem, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memattr import cli

from badfiles import _with_meta, bad_files, good_trace


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    out = bad_files(tmp)
    # Valid form, failing run: the v11 ordering trips lockdep part way.
    v11 = tmp / "vm-kwargs-v11.trace"
    v11.write_bytes(_with_meta(good_trace(), vm_kwargs={"semantics": "v11"}))
    out["vm-kwargs-v11"] = v11
    return out


def commands(path, out_dir):
    return {
        "show": ["show", str(path)],
        "run": ["run", str(path), "--no-progress"],
        "compare": ["compare", "--trace", str(path), "--no-progress", "--no-plot", "--jobs", "1", "--out", str(out_dir)],
    }


def one_line_failure(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    return code, text


@pytest.mark.parametrize("cmd", ["show", "run", "compare"])
def test_every_bad_file_fails_in_one_line(files, cmd, capsys, tmp_path):
    for name, path in files.items():
        if name == "vm-kwargs-v11" and cmd == "show":
            continue  # its form is valid: show summarises it
        code, text = one_line_failure(commands(path, tmp_path)[cmd], capsys)
        assert code != 0, (name, text)
        assert "Traceback" not in text, (name, text)
        if cmd == "compare" and name == "vm-kwargs-v11":
            # compare runs the trace in workers and lists each failure on
            # one line of its table.
            failed = [ln for ln in text.splitlines() if ln.startswith("failed: ")]
            assert failed and all("LockdepError" in ln for ln in failed), text
            continue
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == 1, (name, text)
        assert str(path) in text, (name, text)


def test_bad_files_through_the_real_command_print_no_traceback(files, tmp_path):
    """The same through ``python -m memattr`` for a few classes: nothing
    on stderr but the one line, exit 2."""
    for name in ("phases-to-2**62", "meta-deeply-nested", "text-arrow-only", "vm-kwargs-v11", "record-byte-flipped"):
        r = subprocess.run(
            [sys.executable, "-m", "memattr", "run", str(files[name]), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
        assert len((r.stdout + r.stderr).strip().splitlines()) == 1, (name, r.stdout, r.stderr)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["run", "churn", "--guest", "1G", "--turnover", "inf"], "--turnover: inf is not a finite number"),
        (["run", "churn", "--guest", "1G", "--turnover", "nan"], "--turnover: nan is not a finite number"),
        (["run", "churn", "--guest", "1G", "--turnover", "1e9"], "--turnover: 1e9 is above 1000"),
        (["run", "churn", "--guest", "1G", "--turnover", "100000"], "--turnover: 100000 is above 1000"),
        (["run", "churn", "--guest", "1G", "--seed", "-1"], "--seed: -1 is not in [0, 2**64)"),
        (["run", "churn", "--guest", "-1G"], "--guest: cannot parse size '-1G'"),
    ],
)
def test_bad_arguments_name_the_argument(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_compare_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    code, text = one_line_failure(["compare", "--sizes", "1G", "--no-progress", "--out", str(f)], capsys)
    assert code == 2 and f"--out {f}: exists and is not a directory" in text
