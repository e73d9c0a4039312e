"""The tour runs end to end on the tiny world and prints every section."""

from __future__ import annotations

from tokenlab.tour import report as tour


def test_tour_tiny(tiny_world, capsys, monkeypatch):
    monkeypatch.setenv("TOKENLAB_CACHE", str(tiny_world.path.parent))
    tour.main(["--preset", "tiny", "--device", "cpu"])
    out = capsys.readouterr().out
    for title, _ in tour.SECTIONS:
        assert f"== {title}" in out
    assert "unigram baseline" in out and "tour finished" in out
    assert "greedy continuations over the 24 orders: 1 distinct" in out  # set-based prompting's guarantee
