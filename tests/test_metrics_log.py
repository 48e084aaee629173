"""``read_metrics``: the one reader of ``RUN/metrics.jsonl`` (the engine's resume check, the demos' tables)."""
from __future__ import annotations

import json

from evaclip.logging import read_metrics


def test_reads_the_records_in_order_and_skips_a_killed_writers_partial_line(tmp_path):
    assert read_metrics(tmp_path) == []  # no log yet
    records = [{"event": "start", "step": 0}, {"step": 1, "train/loss": 2.5}, {"event": "end", "step": 1}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 2, "train/lo')  # cut mid-line by a kill
    assert read_metrics(tmp_path) == records
