"""The learning metrics and verdicts (daemon/metrics.py): pure functions, table tests."""

from __future__ import annotations

import json

import pytest

from daemon import metrics
from daemon.jobs import Job, marker_text
from daemon.metrics import (
    BARELY_CHANGES,
    LOSS_ROSE,
    learning_metrics,
    loss_points,
    render_difference,
    smooth_curve,
    trimmed_mean,
    verdicts,
    window_means,
)
from daemon.notify import build_message


def _series(losses):
    return [{"step": i + 1, "loss": v, "t": 0} for i, v in enumerate(losses)]


@pytest.mark.parametrize(
    "records, expected",
    [
        ([], []),
        ([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], [(1, 1.0), (2, 0.5)]),
        # a resumed run repeats steps: the last value of a step wins, in step order
        (
            [{"step": 2, "loss": 0.9}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.7}],
            [(1, 1.0), (2, 0.7)],
        ),
        # no loss, a NaN, a bool, a torn line's leftovers: skipped
        (
            [{"step": 1}, {"step": 2, "loss": float("nan")}, {"step": True, "loss": 1.0}, "x", None],
            [],
        ),
    ],
)
def test_loss_points(records, expected):
    assert loss_points(records) == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0], 1.0),
        ([1.0, 2.0, 3.0], 2.0),
        ([1.0, 1.0, 1.0, 1.0, 100.0], 1.0),  # one spike does not decide
        ([0.0, 1.0, 1.0, 1.0, 1.0], 1.0),
    ],
)
def test_trimmed_mean(values, expected):
    assert trimmed_mean(values) == pytest.approx(expected)


def test_window_means_use_the_first_and_last_quarter():
    points = loss_points(_series([2.0] * 25 + [1.5] * 50 + [1.0] * 25))
    assert window_means(points) == (pytest.approx(2.0), pytest.approx(1.0))
    assert window_means([]) == (None, None)
    assert window_means([(1, 0.5)]) == (0.5, 0.5)


def test_smooth_curve_thins_and_averages():
    points = loss_points(_series([1.0, 3.0] * 100))  # 200 noisy steps
    curve = smooth_curve(points, max_points=50)
    assert len(curve) == 50
    assert all(loss == pytest.approx(2.0) for _, loss in curve)  # the noise averages out
    assert curve[0][0] < curve[-1][0]
    assert smooth_curve(loss_points(_series([1.0, 2.0])), 50) == [[1.0, 1.0], [2.0, 2.0]]
    assert smooth_curve([]) == []


@pytest.mark.parametrize(
    "start, end, effect, expected",
    [
        (1.2, 0.9, 0.04, []),  # a learning run (measured: 1.21 -> 0.90, effect 0.04)
        (1.2, 1.2, 0.0001, [BARELY_CHANGES]),  # a vanishing learning rate
        (1.0, 1.05, 0.05, []),  # flat: real diffusion losses often are; no warning on its own
        (1.0, 1.3, 0.05, [LOSS_ROSE]),  # clearly rose
        (1.0, 1.3, 0.0, [BARELY_CHANGES, LOSS_ROSE]),
        (None, None, None, []),  # nothing measured: no verdict
        (1.0, 0.9, None, []),  # no base render (an older worker's result): no effect verdict
    ],
)
def test_verdicts(start, end, effect, expected):
    assert verdicts(start, end, effect) == expected


def test_barely_changes_sentence_says_what_to_do():
    assert BARELY_CHANGES == "the LoRA barely changes the picture (train longer or raise the learning rate)"
    assert LOSS_ROSE.startswith("the loss rose")


def test_learning_metrics_has_every_key():
    m = learning_metrics(_series([1.3] * 30 + [0.9] * 30), steps=60, lora_effect=0.05)
    assert tuple(m) == metrics.METRIC_KEYS
    assert m["steps"] == 60 and m["warnings"] == []
    assert m["loss_start"] == pytest.approx(1.3) and m["loss_end"] == pytest.approx(0.9)
    assert m["loss_curve"][0][1] == pytest.approx(1.3) and m["loss_curve"][-1][1] == pytest.approx(0.9)
    json.dumps(m)  # plain JSON
    empty = learning_metrics([], steps=None, lora_effect=None)
    assert empty["loss_start"] is None and empty["steps"] is None and empty["warnings"] == []


def test_render_difference(tmp_path):
    from PIL import Image

    black, white, grey = (tmp_path / f"{n}.png" for n in ("black", "white", "grey"))
    Image.new("RGB", (8, 8), (0, 0, 0)).save(black)
    Image.new("RGB", (8, 8), (255, 255, 255)).save(white)
    Image.new("RGB", (8, 8), (51, 51, 51)).save(grey)
    assert render_difference(black, black) == 0.0
    assert render_difference(black, white) == pytest.approx(1.0)
    assert render_difference(black, grey) == pytest.approx(0.2)
    Image.new("RGB", (4, 4)).save(tmp_path / "small.png")
    assert render_difference(black, tmp_path / "small.png") is None
    assert render_difference(black, tmp_path / "missing.png") is None


METRICS = {
    "steps": 1200,
    "loss_start": 0.42,
    "loss_end": 0.31,
    "loss_curve": [[1, 0.42], [1200, 0.31]],
    "lora_effect": 0.004,
    "warnings": [BARELY_CHANGES],
}


def test_notification_says_the_loss():
    view = {
        "id": "j1",
        "name": "alice",
        "state": "done",
        "total_steps": 1200,
        "started_at": 0.0,
        "ended_at": 41 * 60.0,
        "metrics": METRICS,
    }
    body = build_message(view).body
    assert body.startswith("alice: done, 1200 steps in 41m 00s, loss 0.42 → 0.31")
    assert BARELY_CHANGES in body


def test_done_marker_lists_the_metrics():
    job = Job(
        id="j1",
        name="alice",
        state="done",
        finished_at=0.0,
        outputs=json.dumps({"lora": "/x/alice.safetensors", "metrics": METRICS}),
        settings="{}",
    )
    text = marker_text(job)
    for line in ("loss_start: 0.42", "loss_end: 0.31", "lora_effect: 0.004", f"warning: {BARELY_CHANGES}"):
        assert line in text


def test_status_json_carries_the_metrics():
    from daemon.status import render_status

    job = Job(
        id="j1",
        name="alice",
        dataset="ohwx_alice",
        state="done",
        created_at=0.0,
        updated_at=0.0,
        finished_at=0.0,
        outputs=json.dumps({"lora": "/x/alice.safetensors", "metrics": METRICS}),
        settings="{}",
        plan="{}",
        remote="{}",
    )
    data = json.loads(render_status([job], show_all=True, as_json=True, daemon_pid=None, now=0.0))
    assert data["jobs"][0]["metrics"] == METRICS and data["jobs"][0]["outputs"]["metrics"] == METRICS


@pytest.mark.parametrize(
    "logs, expected",
    [
        ([], None),
        ([{"message": "Training step 3/10"}], None),
        ([{"message": "step 3/10, loss: 0.42"}], 0.42),
        ([{"message": "step 3/10 loss=4.2e-1"}, {"message": "uploading"}], 0.42),
        ([{"message": "loss 0.9"}, {"message": "step 5/10 Loss 0.31"}], 0.31),  # the newest
        (["step 1/2 loss: 1.5"], 1.5),
    ],
)
def test_fal_loss_from_logs(logs, expected):
    from engines.fal.engine import loss_from_logs

    assert loss_from_logs(logs) == (None if expected is None else pytest.approx(expected))
