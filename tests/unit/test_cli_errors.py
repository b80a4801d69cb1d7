"""Every command-line tool ends on an error the same way: one line on stderr, exit status 2; -v re-raises."""

from __future__ import annotations

import pytest

from xsr_core.__main__ import main as xsr_main
from xsr_core.cli_common import error_status
from xsr_core.eval.metrics import MetricInputError
from xsr_core.eval.run import RunError
from xsr_core.refdb.store import RefDBError
from xsr_core.train.data import PrepareError

RUN = "eval run --input {gone} --out {tmp}/out"
METRICS = "eval metrics --sr {gone} --metrics psnr"
PREPARE = "train prepare --images {gone} --out {tmp}/p --encoder {tmp}/enc.safetensors"


@pytest.mark.parametrize(
    "argv, verbose_argv, exc_type, prefix",
    [
        (RUN, RUN + " -v", RunError, "xsr eval run: error: input folder"),
        (METRICS, METRICS + " -v", MetricInputError, "xsr eval metrics: error: --hr is needed"),
        (METRICS, METRICS + " --traceback", MetricInputError, "xsr eval metrics: error: --hr is needed"),
        (PREPARE, PREPARE + " -v", PrepareError, "xsr train: error: image folder"),
        ("refdb info --db {gone}", "refdb -v info --db {gone}", RefDBError, "xsr refdb: error: reference DB"),
    ],
    ids=["eval-run", "eval-metrics", "eval-metrics-traceback", "train", "refdb"],
)
def test_cli_error_is_one_line_and_v_shows_the_traceback(argv, verbose_argv, exc_type, prefix, tmp_path, capsys):
    def words(template: str) -> list[str]:
        return template.format(tmp=tmp_path, gone=tmp_path / "nowhere").split()

    assert xsr_main(words(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.endswith(" (-v for the traceback)\n") and err.count("\n") == 1, err
    with pytest.raises(exc_type):
        xsr_main(words(verbose_argv))


def test_cli_error_message_forms(capsys):
    assert error_status(RuntimeError("ComfyUI exited\nlog line 1\nlog line 2"), "xsr eval run", first_line=True) == 2
    assert capsys.readouterr().err == "xsr eval run: error: ComfyUI exited (-v for the full message and traceback)\n"
    assert error_status(RuntimeError("a\nb"), "xsr eval metrics") == 2
    assert capsys.readouterr().err == "xsr eval metrics: error: a\nb (-v for the traceback)\n"
    assert error_status(KeyError("x"), "xsr train", expected=False) == 2
    assert capsys.readouterr().err == "xsr train: error: KeyError: 'x' (-v for the traceback)\n"
