"""The "Training jobs" widget in a headless viewer: a tiny cpu-tiny job started from the form runs to
the end while the progress bar and the loss curves follow metrics.jsonl; a job outlives its closed
widget, is re-attached, hands its checkpoint to the Inference widget and is cancelled with a
checkpoint; a monitored run's learning curve is plotted with its chance levels."""

from __future__ import annotations

import json

import pytest
from qtpy.QtWidgets import QWidget

from napari_mammodino.widgets.jobs import JobsWidget
from helpers import EXAM, TINY
from training.jobs import CANCELLED, FINISHED, RUNNING, Job, cli_options

TIMEOUT_MS = 240_000  # generous: CI machines are slow and shared


class InferenceStandIn(QWidget):
    """What the Jobs widget relies on of the Inference widget: ``use_checkpoint(path)``."""

    def __init__(self):
        super().__init__()
        self.checkpoints: list[str] = []

    def use_checkpoint(self, path: str) -> None:
        self.checkpoints.append(path)


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits it; tiny models gain nothing from more


def fill_pretrain_form(widget: JobsWidget, out, steps: int, checkpoint_every: int) -> None:
    widget.kind.setCurrentText("pretrain")
    widget.preset.setCurrentText("cpu-tiny")
    widget.data.setText(str(EXAM))
    widget.output.setText(str(out))
    widget.steps.setValue(steps)
    widget.batch_size.setValue(2)
    widget.overrides.setText(" ".join([*TINY, f"train.checkpoint_every={checkpoint_every}"]))


def test_a_job_started_from_the_form_runs_and_its_progress_and_curves_follow_the_metrics(
        make_napari_viewer, qtbot, tmp_path, one_thread):
    viewer = make_napari_viewer()
    widget = JobsWidget(viewer, poll_ms=250)
    viewer.window.add_dock_widget(widget, name="Training jobs")
    assert widget.finetune_box.isHidden() and not widget.cancel_button.isEnabled()
    fill_pretrain_form(widget, tmp_path / "run", steps=3, checkpoint_every=3)
    widget.start_button.click()
    job = widget.job
    assert job is not None and job.run_dir == tmp_path / "run" and job.total == 3
    assert widget.timer.isActive() and not widget.start_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.status.text().startswith("finished"), timeout=TIMEOUT_MS)
    assert job.status() == FINISHED and not widget.timer.isActive()
    assert widget.progress.value() == widget.progress.maximum() == 1000
    assert "step 3/3 (100%)" in widget.progress.format()
    rows = job.metrics()
    assert {"total", "dino", "ibot", "koleo"} <= set(widget.lines)
    for term, line in widget.lines.items():
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == pytest.approx([row[term] for row in rows])
    assert '"step": 3' in widget.log.toPlainText()  # the final report closes the log tail
    assert widget.use_button.isEnabled() and widget.start_button.isEnabled()
    # No Inference widget docked: "Use this checkpoint" opens the plugin's (once the manifest has it).
    widget.use_button.click()
    takers = [w for w in viewer.window.dock_widgets.values()
              if w is not widget and callable(getattr(w, "use_checkpoint", None))]
    if takers:
        assert takers[0].checkpoint.text() == str(job.latest_checkpoint())
        assert widget.status.text() == f"Inference widget uses {job.latest_checkpoint()}"
    else:
        assert widget.status.text() == f"no Inference widget to take {job.latest_checkpoint()}"


def test_a_job_outlives_its_widget_is_reattached_hands_its_checkpoint_over_and_is_cancelled(
        make_napari_viewer, qtbot, tmp_path, one_thread):
    viewer = make_napari_viewer()
    inference = InferenceStandIn()
    viewer.window.add_dock_widget(inference, name="Inference")
    first = JobsWidget(viewer, poll_ms=250)
    viewer.window.add_dock_widget(first, name="Training jobs")
    fill_pretrain_form(first, tmp_path / "run", steps=500, checkpoint_every=1)
    job = first.start()
    try:
        qtbot.waitUntil(first.use_button.isEnabled, timeout=TIMEOUT_MS)  # the first checkpoint is saved
        # Mid-run (1 step or more of 500 done): the bar, its text and the curves show the steps so far.
        qtbot.waitUntil(lambda: first.lines and 0 < first.progress.value() < 1000, timeout=TIMEOUT_MS)
        done = first.lines["total"].get_xdata()[-1]
        assert first.progress.format().startswith(f"step {done}/500 (")
        assert first.status.text().startswith(f"running: step {done}/500 (")
        first.use_button.click()
        assert inference.checkpoints == [str(tmp_path / "run" / "checkpoints" / "last.safetensors")]
        assert first.status.text().startswith("Inference widget uses")

        viewer.window.remove_dock_widget(first)
        first.close()
        assert not first.timer.isActive()
        assert Job.attach(tmp_path / "run").status() == RUNNING  # closing the widget left the job alone

        second = JobsWidget(viewer, poll_ms=250)
        assert second.attach(tmp_path / "run").pid == job.pid
        assert second.output.text() == str(tmp_path / "run") and second.cancel_button.isEnabled()
        # The form shows the job as it was started, ready to resume it once it stopped.
        assert (second.preset.currentText(), second.data.text(), second.steps.value(), second.batch_size.value()) \
            == ("cpu-tiny", str(EXAM), 500, 2)
        overrides = [o for o in [*TINY, "train.checkpoint_every=1"] if not o.startswith("train.batch_size=")]
        assert second.overrides.text() == " ".join(overrides) and second.resume.isChecked()
        assert second.arguments()[1]["resume"] is True
        second.cancel_button.click()
        qtbot.waitUntil(lambda: second.status.text().startswith("cancelled"), timeout=TIMEOUT_MS)
        assert job.status() == CANCELLED and job.latest_checkpoint().is_file()
        assert not second.cancel_button.isEnabled() and second.start_button.isEnabled()
        assert second.lines["total"].get_xdata()[-1] == job.progress().done
    finally:
        job.cancel(force=True)


def test_form_mistakes_give_one_line_and_start_nothing(make_napari_viewer, tmp_path):
    widget = JobsWidget(make_napari_viewer())
    assert widget.start() is None and widget.status.text() == "error: choose an output folder for the run"
    widget.output.setText(str(tmp_path / "run"))
    assert widget.start() is None and widget.status.text().startswith("error: choose the data")
    widget.kind.setCurrentText("finetune")
    assert widget.pretrain_box.isHidden() and not widget.finetune_box.isHidden()
    assert widget.start() is None and widget.status.text() == "error: choose a pretrained checkpoint to fine-tune"
    widget.kind.setCurrentText("pretrain")
    widget.data.setText(str(EXAM))
    widget.overrides.setText("schedule.base_lr=1e-3 train.seed=3")
    widget.batch_size.setValue(8)
    kind, args, out = widget.arguments()
    assert (kind, out, args["config"], args["data"]) == ("pretrain", str(tmp_path / "run"), "cpu-tiny", str(EXAM))
    assert args["set"] == ["schedule.base_lr=1e-3", "train.seed=3", "train.batch_size=8"]
    widget.device.setCurrentText("cpu")  # passed on only where the trainer has a --device option
    if "--device" in cli_options("pretrain"):
        assert widget.arguments()[1]["device"] == "cpu"
    else:
        assert widget.start() is None and "no --device option" in widget.status.text()
    widget.kind.setCurrentText("finetune")
    widget.checkpoint.setText(str(tmp_path / "encoder.safetensors"))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,patient_id,density,lesion\na.dcm,P1,B,0\n")
    widget.labels.setText(str(labels))
    widget.labels.edit.editingFinished.emit()  # the target list offers the CSV's columns
    assert [widget.target.itemText(i) for i in range(widget.target.count())] == ["patient_id", "density", "lesion"]
    widget.target.setCurrentText("density")
    widget.device.setCurrentText("auto")
    kind, args, _ = widget.arguments()
    assert kind == "finetune" and (args["labels"], args["target"], args["mode"], args["epochs"], args["batch_size"]) \
        == (str(labels), "density", "linear", 10, 8)
    assert widget.attach(tmp_path) is None and "holds no job" in widget.status.text()
    assert widget.job is None and not (tmp_path / "run").exists()


def test_the_learning_curve_of_a_monitored_run_is_plotted_with_its_chance_levels_and_follows_new_lines(
        make_napari_viewer, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"kind": "pretrain", "pid": 2 ** 22 + 7, "total": 4, "args": [
        "--config", "cpu-tiny", "--data", str(EXAM), "--set", "monitor.every=2", "--monitor-phantom", "bench.csv"],
        "command": ["mammodino", "pretrain"]}))
    (run / "job.exit").write_text(json.dumps({"returncode": 0, "cancelled": False}))

    def evaluation(step: int, top1: float, auroc: float | None) -> dict:
        return {"step": step, "kind": "eval", "eval_s": 2.0, "eval": {
            "real_view_top1": top1, "real_view_top1_chance": 0.142, "real_view_mean_rank": 2.0,
            "real_view_mean_rank_chance": 4.0, "attention_ratio_real": 1.1, "attention_ratio_real_chance": 1.0,
            "phantom_lesion_patch_auroc": auroc, "phantom_lesion_patch_auroc_chance": 0.5, "real_images": 8}}

    rows = [{"step": 1, "total": 9.0, "dino": 6.0}, {"step": 2, "total": 8.5, "dino": 5.8}, evaluation(2, 0.25, None)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    widget = JobsWidget(make_napari_viewer())
    assert widget._hint is not None  # an empty learning curve says how to get one
    widget.attach(run)
    assert widget.plots.tabText(1) == "learning curve"
    assert (widget.monitor_every.value(), widget.monitor_phantom.text()) == (2, "bench.csv")
    assert "monitor.every" not in widget.overrides.text()
    assert list(widget.lines["total"].get_xdata()) == [1, 2]  # the eval line is no loss point
    assert set(widget.eval_lines) == {"real_view_top1", "attention_ratio_real", "phantom_lesion_patch_auroc"}
    assert list(widget.eval_lines["real_view_top1"].get_xdata()) == [2]
    assert list(widget.eval_lines["phantom_lesion_patch_auroc"].get_xdata()) == []  # undefined yet
    chance = widget.chance_lines["real_view_top1"]
    assert list(chance.get_ydata()) == [0.142, 0.142] and chance.get_linestyle() == "--"
    assert chance.get_color() == widget.eval_lines["real_view_top1"].get_color()
    assert widget._hint is None
    with open(run / "metrics.jsonl", "a") as f:  # the run goes on: the next poll draws the new points
        for row in ({"step": 3, "total": 8.0, "dino": 5.5}, {"step": 4, "total": 7.9, "dino": 5.4},
                    evaluation(4, 0.5, 0.7)):
            f.write(json.dumps(row) + "\n")
    widget.poll()
    assert list(widget.eval_lines["real_view_top1"].get_ydata()) == [0.25, 0.5]
    assert list(widget.eval_lines["phantom_lesion_patch_auroc"].get_xdata()) == [4]
    assert list(widget.lines["total"].get_xdata()) == [1, 2, 3, 4]


def test_the_form_passes_the_learning_curve_options_and_refuses_half_of_them(make_napari_viewer, tmp_path):
    widget = JobsWidget(make_napari_viewer())
    widget.output.setText(str(tmp_path / "run"))
    widget.data.setText(str(EXAM))
    widget.monitor_phantom.setText(str(tmp_path / "bench.csv"))
    assert widget.start() is None and "how often to evaluate" in widget.status.text()
    widget.monitor_every.setValue(50)
    _, args, _ = widget.arguments()
    assert args["set"][-1] == "monitor.every=50" and args["monitor_phantom"] == str(tmp_path / "bench.csv")
    assert args["monitor_real"] is None and {"--monitor-real", "--monitor-phantom"} <= cli_options("pretrain")


def test_an_image_report_job_runs_from_the_form_and_its_checkpoint_is_a_clip_model(
        make_napari_viewer, qtbot, tmp_path, one_thread):
    from helpers import SAMPLES
    from training.ssl.clip import has_text_tower

    viewer = make_napari_viewer()
    widget = JobsWidget(viewer, poll_ms=250)
    widget.kind.setCurrentText("clip")
    assert widget.pretrain_box.isHidden() and widget.finetune_box.isHidden() and not widget.clip_box.isHidden()
    widget.output.setText(str(tmp_path / "clip"))
    widget.start_button.click()
    assert widget.job is None and widget.status.text().startswith("error: choose the data")
    widget.data.setText(str(SAMPLES / "labels.csv"))
    widget.clip_steps.setValue(3)
    widget.batch_size.setValue(4)
    kind, args, _ = widget.arguments()
    assert (kind, args["steps"], args["batch_size"], args["checkpoint"]) == ("clip", 3, 4, None)
    widget.start_button.click()
    job = widget.job
    assert job is not None and job.total == 3
    qtbot.waitUntil(lambda: widget.status.text().startswith("finished"), timeout=TIMEOUT_MS)
    assert "loss" in widget.lines and list(widget.lines["loss"].get_xdata()) == [1, 2, 3]
    assert has_text_tower(job.latest_checkpoint())
    widget.kind.setCurrentText("pretrain")
    widget.attach(tmp_path / "clip")  # re-attached: the form is the job's again, ready to resume
    assert widget.kind.currentText() == "clip" and widget.clip_resume.isChecked()
    assert widget.clip_steps.value() == 3
