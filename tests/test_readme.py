"""Every Python snippet of the README runs as written, so the README cannot drift from the code.

The snippets run in order in one namespace, as a reader pastes them into one session. An HTML
comment right before a snippet may say how the test runs it, visibly in the README's source:

* ``<!-- test: replace "A" with "B" -->``: a smaller size for the test (the README's own figure
  is what a user runs; the test swaps it, e.g. a 12-layer model for a 2-layer one);
* ``<!-- test: torchrun N -->``: the snippet is a script for ``torchrun --nproc-per-node N``;
  it runs as N local ranks (``runtime.launch_local``), and must exit 0 on every rank.

Shell blocks are not run here (CI runs the README's test command; ``test_quick_start`` checks
the demo command's Python part).
"""
from __future__ import annotations

import os
import re
import textwrap

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_BLOCK = re.compile(r"(?P<directives>(?:<!-- test: [^\n]*-->\n)*)```python\n(?P<code>.*?)```", re.S)
_REPLACE = re.compile(r'replace "(?P<old>(?:[^"\\]|\\.)*)" with "(?P<new>(?:[^"\\]|\\.)*)"')


def _snippets() -> list[tuple[int, list[str], str]]:
    text = open(README).read()
    out = []
    for match in _BLOCK.finditer(text):
        line = text[:match.start("code")].count("\n") + 1
        directives = re.findall(r"<!-- test: ([^\n]*?) -->", match.group("directives"))
        out.append((line, directives, match.group("code")))
    return out


def _prepared(code: str, directives: list[str]) -> str:
    for directive in directives:
        for m in _REPLACE.finditer(directive):
            old, new = m.group("old").replace('\\"', '"'), m.group("new").replace('\\"', '"')
            assert old in code, f"README directive replaces {old!r}, which the snippet no longer contains"
            code = code.replace(old, new)
    return code


def test_the_readme_has_python_snippets():
    assert len(_snippets()) >= 5


def test_every_python_snippet_of_the_readme_runs(tmp_path, monkeypatch):
    from runtime.launch import launch_local
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, directives, code in _snippets():
        code = _prepared(code, directives)
        ranks = [int(m.group(1)) for d in directives for m in [re.match(r"torchrun (\d+)", d)] if m]
        if ranks:
            script = tmp_path / f"readme_{line}.py"
            script.write_text(textwrap.dedent(code))
            codes, logs = launch_local([str(script)], ranks[0], timeout_s=300,
                                       env={"PYTHONPATH": os.path.dirname(README)})
            assert codes == [0] * ranks[0], f"README snippet at line {line} failed:\n{logs[0][-3000:]}"
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:   # noqa: BLE001 - re-raised with the snippet's place in the README
            pytest.fail(f"README snippet at line {line} raised {type(exc).__name__}: {exc}")
