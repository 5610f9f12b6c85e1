"""``python -m benchmarks.default_run --collect``: the record of a default run made by hand."""

from __future__ import annotations

import json

from benchmarks import default_run

LOG = """[2026-12-07 15:01:30][molex.train][INFO] - trainer.precision=auto: bf16-mixed on this machine
[2026-12-07 15:17:41][molex.layer.health][WARNING] - routing health at step 40: dead experts (share < 1/(10 E)): x 1/8
[2026-12-07 15:17:42][some.library][WARNING] - something else
[2026-12-07 15:17:43,120][some.library][WARNING] - something else
run directory: /tmp/run  (wall time 358 s)
"""
TIME = """\tElapsed (wall clock) time (h:mm:ss or m:ss): 6:09.23
\tMaximum resident set size (kbytes): 4434456
"""


def test_collect_reads_metrics_log_and_time(tmp_path):
    metrics = {
        "before": {"accuracy": 0.0, "per_task": {"add": 0.0}, "predictions": ["x"]},
        "after": {"accuracy": 0.65, "per_task": {"add": 0.8}, "predictions": ["y"]},
        "val_lm_loss": 0.3415,
        "routing": {"health": {"dead_experts": 0}},
        "wall_seconds": 358.0,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "log.txt").write_text(LOG)
    (tmp_path / "time.txt").write_text(TIME)
    out = tmp_path / "record.json"
    report = default_run.main(
        [
            "--collect",
            str(tmp_path),
            "--log",
            str(tmp_path / "log.txt"),
            "--time",
            str(tmp_path / "time.txt"),
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    assert report["precision"] == "bf16-mixed" and report["after"] == {"accuracy": 0.65, "per_task": {"add": 0.8}}
    assert report["health_warnings"] == [{"step": 40, "text": "dead experts (share < 1/(10 E)): x 1/8"}]
    # a warning repeated on every call is recorded once, with its count
    assert report["other_warnings"] == [{"text": "[some.library][WARNING] - something else", "count": 2}]
    assert (report["time_wall"], report["peak_rss_gb"]) == ("6:09.23", 4.23)
    assert report["machine"]["precision"] == "bf16-mixed" and "commit" in report["machine"]
