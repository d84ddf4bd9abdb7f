"""benchmarks/wire_bytes: idle bytes are measured at length once per link profile and shared, never a 0."""

from benchmarks.wire_bytes import share_idle, table


def _row(algorithm: str, profile: str, window: float, per_day: int) -> dict:
    return {
        "algorithm": algorithm,
        "profile": profile,
        "idle_window_s": window,
        "idle_B_per_hour": per_day // 24,
        "idle_B_per_day": per_day,
        "round_up_B": 4000,
    }


def test_short_idle_window_takes_the_long_one_of_the_same_profile() -> None:
    rows = [
        _row("spsa", "standard", 120.0, 31_000_000),
        _row("spsa", "thin", 500.0, 229_046),
        _row("lowrank", "standard", 30.0, 29_000_000),
        _row("lowrank", "thin", 30.0, 0),
    ]
    out = share_idle(rows)
    assert [r["idle_B_per_day"] for r in out] == [31_000_000, 229_046, 31_000_000, 229_046]
    assert "idle_from" not in out[0] and "idle_from" not in out[1]
    assert out[3]["idle_from"].startswith("spsa thin (500 s")
    assert rows[3]["idle_B_per_day"] == 0, "the input rows are left as measured"
    md = table(out)
    assert "229,046 (as spsa thin)" in md and "| 0 |" not in md


def test_rows_of_one_window_length_are_left_alone() -> None:
    rows = [_row("spsa", "thin", 500.0, 200_000), _row("lowrank", "thin", 500.0, 210_000)]
    assert share_idle(rows) == rows
