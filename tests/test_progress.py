"""Progress bars are for a person at a terminal: off in logs and under CI."""

from __future__ import annotations

import io

import pytest

from ec_lora_t.progress import progress_bar, progress_enabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("terminal", "ci", "expected"),
    [(True, None, True), (True, "true", False), (True, "1", False), (True, "false", True), (False, None, False)],
)
def test_bars_only_on_a_terminal_outside_ci(monkeypatch, terminal, ci, expected):
    monkeypatch.setattr("sys.stderr", Terminal() if terminal else io.StringIO())
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert progress_enabled() is expected
    stream = io.StringIO()
    with progress_bar(total=3, file=stream) as bar:
        bar.update(3)
    assert ("3/3" in stream.getvalue()) is expected
