"""The command line: sub-command dispatch, the --report_to alias, and answers that need no torch."""

import subprocess
import sys
import types

import pytest

from sfm_hf import cli


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_lists_every_option_without_importing_torch():
    out = run_python(
        "import sys\n"
        "from sfm_hf.cli import main\n"
        "assert main(['--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules))\n"
    )
    assert "--distill.iterations" in out and "--tracker_project" in out and "--report_to" in out
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("first", [
    "import sfm_hf\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules",
    "from sfm_hf.modeling_sfm import SFMForImageClassification",  # the module that itself imports transformers
])
def test_the_auto_classes_know_the_bundle_whatever_is_imported_first(first):
    out = run_python(
        "import sys\n"
        f"{first}\n"
        "from transformers import AutoConfig, AutoModelForImageClassification\n"
        "config = AutoConfig.for_model('sfm')\n"
        "print(AutoModelForImageClassification._model_mapping[type(config)].__module__)\n"
    )
    assert out.strip() == "sfm_hf.modeling_sfm"


def test_sub_commands_get_their_own_arguments(monkeypatch):
    received = []
    module = types.ModuleType("fake_command")
    module.main = lambda argv: received.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", "fake_command:main")
    assert cli.main(["fake", "--help", "a"]) == 7
    assert received == [["--help", "a"]]


def test_merge_statistics_is_a_sub_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge-statistics", "--help"])
    assert exit_info.value.code == 0 and "sfm-hf merge-statistics" in capsys.readouterr().out


def test_report_to_is_the_trackers_option():
    assert cli._expand_aliases(["--report_to", "tensorboard", "--ipc", "2"]) == ["--trackers", "tensorboard", "--ipc", "2"]
    assert cli._expand_aliases(["--report_to=wandb,tensorboard"]) == ["--trackers=wandb,tensorboard"]


def test_user_mistake_is_one_error_line(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and "Traceback" not in err
