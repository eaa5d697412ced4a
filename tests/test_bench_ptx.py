"""``rlhf-fast bench --ptx``: the GPU readiness report and its exit status.

The report is built from the session's one ahead-of-time compile (``tests/_aot.py``, shared with
``tests/test_triton_aot.py``); the verdicts are ``aot.problems``, the criteria that test asserts.
Broken results are made by editing one real result's figures (a spill, a scalar load), so each
criterion is seen to fail the command.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

triton = pytest.importorskip("triton")

from rlhf_fast.kernels import aot  # noqa: E402

if not os.path.exists(triton.knobs.nvidia.cuobjdump.path):
    pytest.skip("this triton has no NVIDIA backend tools (ptxas, cuobjdump)", allow_module_level=True)

from _aot import compiled  # noqa: E402

from rlhf_fast.bench import ptx, run  # noqa: E402


def _first(*, tiles: bool, half: bool = False) -> aot.AotResult:
    """A real result of a row kernel that writes a gradient (tiles=False) or of a tl.dot kernel (on
    16-bit inputs with ``half``)."""
    for result in compiled().values():
        if half and result.spec.dtype not in ("bf16", "fp16"):
            continue
        if bool(result.spec.tiles_read) == tiles and (tiles or result.spec.rows_written):
            return result
    raise AssertionError("no such kernel among the AOT specs")


def test_report_of_every_compiled_kernel():
    results = list(compiled().values())
    table_rows = ptx.rows(results)
    text, failures = ptx.report(table_rows)
    assert failures == 0, text
    assert [r["problems"] for r in table_rows] == [""] * len(results)
    assert {r["stream"] for r in table_rows} == {"logits", "tiles"}
    assert {r["cc"] for r in table_rows} == set(aot.TARGETS)
    # one table line per result, under the header and its rule
    assert len(text.splitlines()) == len(results) + 2 + 2


@pytest.mark.parametrize(
    ("tiles", "change", "message"),
    [
        (True, {"mma": "fma"}, "not on the tensor cores"),
        (False, {"spill_stores": 8, "spill_loads": 8}, "registers spill"),
        (False, {"local": 16}, "local memory"),
        (False, {"widest_load": 4}, "logits rows are read with scalar loads"),
        (False, {"vector_load_bytes": 8}, "part of the row is read with scalar loads"),
        (False, {"widest_store": 2}, "gradient rows are written with scalar stores"),
        (True, {"widest_load": 4}, "tiles are read with scalar loads"),
        (True, {"vector_load_bytes": 8}, "H step of the tiles"),
    ],
)
def test_each_criterion_fails_the_report(tiles, change, message):
    good = _first(tiles=tiles, half="mma" in change)
    assert aot.problems(good) == []
    bad = dataclasses.replace(good, **change)
    assert any(message in p for p in aot.problems(bad)), aot.problems(bad)
    text, failures = ptx.report(ptx.rows([good, bad]))
    assert failures == 1
    assert f"FAIL {bad.name} {bad.spec.variant}" in text and message in text


def test_exit_status(monkeypatch, capsys, tmp_path):
    """``--ptx`` prints the table and exits 0 on ready kernels, 1 on one that spills; no compile is
    repeated here: compile_all returns the session's results."""
    results = list(compiled().values())
    spilled = dataclasses.replace(results[0], spill_stores=4, spill_loads=4)
    monkeypatch.setattr(aot, "compile_all", lambda *args, **kwargs: results)
    assert run.main(["--ptx", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "widest ld B" in out and "wgmma" in out and "wrote" in out
    (json_path,) = tmp_path.glob("ptx-*.json")
    written = json.loads(json_path.read_text())
    assert [(r["kernel"], r["cc"], r["problems"]) for r in written] == [(r.name, r.cc, "") for r in results]
    monkeypatch.setattr(aot, "compile_all", lambda *args, **kwargs: [*results, spilled])
    assert run.main(["--ptx"]) == 1
    assert "registers spill" in capsys.readouterr().out
