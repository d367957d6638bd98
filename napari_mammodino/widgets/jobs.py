"""The "Training jobs" widget: start a pretraining or fine-tuning job from a form, watch it (progress
with ETA, live loss curves, the learning curve of a monitored pretraining run, status, log tail),
cancel it, re-attach to it later, and hand its latest checkpoint to the Inference widget.

The widget is thin: :mod:`training.jobs` starts the job as a detached subprocess and reads its run
folder. A QTimer polls the job about once a second; each poll reads only what metrics.jsonl and the
log gained, so the GUI thread never waits on the job. Closing the widget stops the polling, never the
job: open the widget again and "Attach" its run folder.
"""

from __future__ import annotations

import csv
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QLineEdit, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QTabWidget, QVBoxLayout,
                            QWidget)

from training.errors import MammoInputError
from training.jobs import KINDS, RUNNING, Job, cli_options, launch, option_values
from training.runs import eval_curves, loss_terms

if TYPE_CHECKING:
    import napari

PRESETS = ("cpu-tiny", "vits14", "vitb14")
DEVICES = ("auto", "cpu", "cuda")
INFERENCE = ("napari-mammodino", "Inference")  # plugin and widget name of the inference widget
# tab20's dark shades, then its light ones: a dozen measures, no two of one colour
CURVE_COLOURS = [matplotlib.colormaps["tab20"](i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
NO_CURVE = ("no learning-curve points yet: pretrain with a monitor CSV (real views and/or a phantom\n"
            "benchmark) and 'evaluate every' N steps; each point is the EMA teacher measured at that step")


def absolute(path: str) -> str:
    """Paths as the job records them: absolute, so that the job resumes from any working folder."""
    return str(Path(path).expanduser().resolve())


class PathEdit(QWidget):
    """A path field with browse buttons: ``modes`` from "folder", "file", "csv", "json", "checkpoint"."""

    FILTERS = {"file": "All files (*)", "csv": "CSV files (*.csv);;All files (*)",
               "json": "JSON configs (*.json);;All files (*)",
               "checkpoint": "Checkpoints (*.safetensors);;All files (*)"}

    def __init__(self, modes: tuple[str, ...], placeholder: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.edit = QLineEdit(self)
        self.edit.setPlaceholderText(placeholder)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        for mode in modes:
            button = QPushButton("folder…" if mode == "folder" else "file…", self)
            button.clicked.connect(lambda _=False, m=mode: self.browse(m))
            layout.addWidget(button)

    def browse(self, mode: str) -> None:
        start = self.text() or str(Path.cwd())
        if mode == "folder":
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Choose a file", start, self.FILTERS[mode])
        if path:
            self.edit.setText(path)
            self.edit.editingFinished.emit()

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self.edit.setText(text)


class JobsWidget(QWidget):
    """Form, controls and live view of one training job at a time (see the module docstring)."""

    def __init__(self, napari_viewer: "napari.Viewer | None" = None, poll_ms: int = 1000):
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.lines: dict[str, Any] = {}  # loss term -> matplotlib Line2D of the plot
        self.eval_lines: dict[str, Any] = {}  # learning-curve measure -> Line2D
        self.chance_lines: dict[str, Any] = {}  # measure -> dashed Line2D of its chance level
        self._plotted = -1  # number of metrics rows drawn
        self._log = ""

        self.kind = QComboBox()
        self.kind.addItems(list(KINDS))
        self.output = PathEdit(("folder",), "run folder: metrics, checkpoints, job log")
        self.data = PathEdit(("folder", "csv"), "DICOM folder or labels CSV")
        self.batch_size = QSpinBox()
        self.batch_size.setRange(0, 1 << 16)
        self.batch_size.setSpecialValueText("default")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        common = QFormLayout()
        for label, field in (("job", self.kind), ("output", self.output), ("data", self.data),
                             ("batch size", self.batch_size), ("device", self.device)):
            common.addRow(label, field)

        self.preset = QComboBox()
        self.preset.setEditable(True)  # a preset name, or the path of a JSON config
        self.preset.addItems(PRESETS)
        self.preset_file = QPushButton("file…")
        self.preset_file.clicked.connect(self._browse_config)
        preset_row = QHBoxLayout()
        preset_row.addWidget(self.preset, 1)
        preset_row.addWidget(self.preset_file)
        self.steps = QSpinBox()
        self.steps.setRange(0, 10_000_000)
        self.steps.setSpecialValueText("preset")
        self.overrides = QLineEdit()
        self.overrides.setPlaceholderText("section.key=value … (optional)")
        self.resume = QCheckBox("resume the run in the output folder")
        self.monitor_real = PathEdit(("csv",), "real views CSV: path, patient_id, laterality, view (optional)")
        self.monitor_phantom = PathEdit(("csv",), "phantom benchmark labels.csv (optional)")
        self.monitor_every = QSpinBox()
        self.monitor_every.setRange(0, 10_000_000)
        self.monitor_every.setSpecialValueText("off")
        self.monitor_every.setSuffix(" steps")
        self.pretrain_box = QGroupBox("pretrain")
        form = QFormLayout(self.pretrain_box)
        form.addRow("config", preset_row)
        form.addRow("steps", self.steps)
        form.addRow("overrides", self.overrides)
        form.addRow("", self.resume)
        form.addRow("curve: real", self.monitor_real)
        form.addRow("curve: phantoms", self.monitor_phantom)
        form.addRow("evaluate every", self.monitor_every)

        self.checkpoint = PathEdit(("checkpoint",), "pretrained encoder (.safetensors)")
        self.labels = PathEdit(("csv",), "labels CSV (path + target columns)")
        self.labels.edit.editingFinished.connect(self._labels_changed)
        self.target = QComboBox()
        self.target.setEditable(True)
        self.mode = QComboBox()
        self.mode.addItems(["linear", "full"])
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100_000)
        self.epochs.setValue(10)
        self.finetune_box = QGroupBox("fine-tune")
        form = QFormLayout(self.finetune_box)
        for label, field in (("checkpoint", self.checkpoint), ("labels", self.labels), ("target", self.target),
                             ("mode", self.mode), ("epochs", self.epochs)):
            form.addRow(label, field)

        self.clip_checkpoint = PathEdit(("checkpoint",), "image encoder (default: the demo encoder)")
        self.clip_steps = QSpinBox()
        self.clip_steps.setRange(0, 10_000_000)
        self.clip_steps.setSpecialValueText("default")
        self.clip_resume = QCheckBox("resume the run in the output folder")
        self.clip_box = QGroupBox("image-report (CLIP)")
        form = QFormLayout(self.clip_box)
        form.addRow("image encoder", self.clip_checkpoint)
        form.addRow("steps", self.clip_steps)
        form.addRow("", self.clip_resume)

        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.attach_button = QPushButton("Attach…")
        self.use_button = QPushButton("Use this checkpoint")
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.attach_button.clicked.connect(lambda: self.attach())
        self.use_button.clicked.connect(self.send_checkpoint)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.cancel_button, self.attach_button, self.use_button):
            buttons.addWidget(button)

        self.status = QLabel("no job")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("")
        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        self.axes = self.figure.add_subplot()
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        self.eval_figure = Figure(figsize=(4, 4.2), layout="constrained")  # room for the legend below
        self.eval_axes = self.eval_figure.add_subplot()
        self.eval_canvas = FigureCanvasQTAgg(self.eval_figure)
        self.eval_canvas.setMinimumHeight(300)
        self._reset_plots()
        self.plots = QTabWidget()
        self.plots.addTab(self.canvas, "losses")
        self.plots.addTab(self.eval_canvas, "learning curve")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(500)
        self.log.setMinimumHeight(80)

        layout = QVBoxLayout(self)
        layout.addLayout(common)
        layout.addWidget(self.pretrain_box)
        layout.addWidget(self.finetune_box)
        layout.addWidget(self.clip_box)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addWidget(self.plots, 1)
        layout.addWidget(self.log)

        self.timer = QTimer(self)
        self.timer.setInterval(poll_ms)
        self.timer.timeout.connect(self.poll)
        self.kind.currentTextChanged.connect(self._kind_changed)
        self._kind_changed(self.kind.currentText())
        self._update_buttons(None)

    # --- the form ---------------------------------------------------------------------------------

    def _kind_changed(self, kind: str) -> None:
        self.pretrain_box.setVisible(kind == "pretrain")
        self.finetune_box.setVisible(kind == "finetune")
        self.clip_box.setVisible(kind == "clip")
        self.data.edit.setPlaceholderText({"pretrain": "DICOM folder or labels CSV",
                                           "clip": "labels CSV: a report column, or attributes to write reports from"}
                                          .get(kind, "image folder the labels' paths are relative to (optional)"))

    def _browse_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a config", str(Path.cwd()), PathEdit.FILTERS["json"])
        if path:
            self.preset.setCurrentText(path)

    def _labels_changed(self) -> None:
        """Offer the labels CSV's columns (but ``path``) as targets."""
        try:
            with open(self.labels.text(), newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError):
            return
        current = self.target.currentText()
        self.target.clear()
        self.target.addItems([column for column in header if column and column != "path"])
        if current:
            self.target.setCurrentText(current)

    def arguments(self) -> tuple[str, dict[str, Any], str]:
        """``(kind, args, run folder)`` for :func:`training.jobs.launch`, from the form. Raises
        :class:`MammoInputError` for a missing field."""
        kind = self.kind.currentText()
        out = self.output.text()
        if not out:
            raise MammoInputError("choose an output folder for the run")
        device = self.device.currentText()
        args: dict[str, Any] = {}
        if kind == "pretrain":
            if not self.data.text():
                raise MammoInputError("choose the data: a DICOM folder or a labels CSV")
            try:
                overrides = shlex.split(self.overrides.text())
            except ValueError as exc:  # an unclosed quote
                raise MammoInputError(f"overrides: {exc}") from None
            if self.batch_size.value():
                overrides.append(f"train.batch_size={self.batch_size.value()}")
            curve = [field.text() for field in (self.monitor_real, self.monitor_phantom)]
            if any(curve) != bool(self.monitor_every.value()):
                raise MammoInputError("learning curve: give a real or phantom CSV and how often to evaluate "
                                      "(evaluate every N steps), or neither")
            if self.monitor_every.value():
                overrides.append(f"monitor.every={self.monitor_every.value()}")
            config = self.preset.currentText().strip() or PRESETS[0]
            args = {"config": absolute(config) if config.endswith(".json") else config,
                    "data": absolute(self.data.text()),
                    "max_steps": self.steps.value() or None, "set": overrides, "resume": self.resume.isChecked(),
                    "monitor_real": absolute(curve[0]) if curve[0] else None,
                    "monitor_phantom": absolute(curve[1]) if curve[1] else None}
        elif kind == "clip":
            if not self.data.text():
                raise MammoInputError("choose the data: a labels CSV of images with reports or attributes")
            checkpoint = self.clip_checkpoint.text()
            args = {"data": absolute(self.data.text()), "resume": self.clip_resume.isChecked(),
                    "checkpoint": (checkpoint if checkpoint.startswith("random:") else absolute(checkpoint))
                    if checkpoint else None,
                    "steps": self.clip_steps.value() or None, "batch_size": self.batch_size.value() or None}
        else:
            for field, what in ((self.checkpoint, "a pretrained checkpoint"), (self.labels, "a labels CSV")):
                if not field.text():
                    raise MammoInputError(f"choose {what} to fine-tune")
            if not self.target.currentText().strip():
                raise MammoInputError("choose the target column of the labels CSV")
            checkpoint = self.checkpoint.text()
            args = {"checkpoint": checkpoint if checkpoint.startswith("random:") else absolute(checkpoint),
                    "labels": absolute(self.labels.text()), "target": self.target.currentText().strip(),
                    "data": absolute(self.data.text()) if self.data.text() else None,
                    "mode": self.mode.currentText(), "epochs": self.epochs.value(),
                    "batch_size": self.batch_size.value() or None}
        if "--device" in cli_options(kind):
            args["device"] = device
        elif device != "auto":
            raise MammoInputError(f"this `mammodino {kind}` picks its device itself (no --device option): "
                                  f"choose device auto")
        return kind, args, out

    # --- actions ----------------------------------------------------------------------------------

    def start(self) -> Job | None:
        """Launch a job from the form; a mistake in the form shows one line in the status, no job."""
        try:
            kind, args, out = self.arguments()
            job = launch(kind, args, out)
        except MammoInputError as exc:
            self._say(f"error: {exc}")
            return None
        self._watch(job)
        return job

    def attach(self, run_dir: str | Path | None = None) -> Job | None:
        """Watch the job of an existing run folder (asks for one when not given)."""
        if run_dir is None:
            run_dir = QFileDialog.getExistingDirectory(self, "Attach to a run folder", self.output.text() or "")
            if not run_dir:
                return None
        try:
            job = Job.attach(run_dir)
        except MammoInputError as exc:
            self._say(f"error: {exc}")
            return None
        self.output.setText(str(job.run_dir))
        self.kind.setCurrentText(job.kind)
        self._fill_form(job)
        self._watch(job)
        return job

    def _fill_form(self, job: Job) -> None:
        """The form as the job was started (its ``job.json`` arguments), ready to start it again: a
        pretraining folder with a checkpoint is resumed."""
        argv = [str(a) for a in job.info.get("args", [])]

        def last(flag: str, default: str = "") -> str:
            return (option_values(argv, flag) or [default])[-1]

        def number(text: str) -> int:
            return int(text) if text.isdigit() else 0

        if job.kind == "pretrain":
            overrides = option_values(argv, "--set")
            own = ("train.batch_size=", "monitor.every=")  # the form's own fields

            def setting(prefix: str) -> int:
                found = [o.split("=", 1)[1] for o in overrides if o.startswith(prefix)]
                return number(found[-1]) if found else 0

            self.preset.setCurrentText(last("--config", PRESETS[0]))
            self.data.setText(last("--data"))
            self.steps.setValue(number(last("--max-steps")))
            self.batch_size.setValue(setting(own[0]))
            self.monitor_every.setValue(setting(own[1]))
            self.monitor_real.setText(last("--monitor-real"))
            self.monitor_phantom.setText(last("--monitor-phantom"))
            self.overrides.setText(shlex.join(o for o in overrides if not o.startswith(own)))
            self.resume.setChecked(job.latest_checkpoint() is not None)
        elif job.kind == "clip":
            self.data.setText(last("--data"))
            self.clip_checkpoint.setText(last("--checkpoint"))
            self.clip_steps.setValue(number(last("--steps")))
            self.batch_size.setValue(number(last("--batch-size")))
            self.clip_resume.setChecked(job.latest_checkpoint() is not None)
        else:
            self.checkpoint.setText(last("--checkpoint"))
            self.labels.setText(last("--labels"))
            self._labels_changed()
            self.target.setCurrentText(last("--target"))
            self.data.setText(last("--data"))
            self.mode.setCurrentText(last("--mode", "linear"))
            self.epochs.setValue(number(last("--epochs")) or self.epochs.value())
            self.batch_size.setValue(number(last("--batch-size")))
        self.device.setCurrentText(last("--device", "auto"))

    def cancel(self) -> None:
        """SIGTERM the job: it saves a checkpoint at the end of its step and exits."""
        try:
            cancelled = self.job is not None and self.job.cancel()
        except MammoInputError as exc:  # a run started outside napari: nothing here to signal
            self._say(f"error: {exc}")
            return
        if cancelled:
            self._say("cancelling: the trainer saves a checkpoint, then exits…")

    def send_checkpoint(self) -> Path | None:
        """Hand the job's latest checkpoint to the Inference widget (opening it when not docked)."""
        path = self.job.latest_checkpoint() if self.job is not None else None
        if path is None:
            self._say("no checkpoint yet")
            return None
        target = self._inference_widget()
        if target is None:
            self._say(f"no Inference widget to take {path}")
            return None
        target.use_checkpoint(str(path))
        self._say(f"Inference widget uses {path}")
        return path

    def _inference_widget(self) -> Any:
        """The docked widget with a ``use_checkpoint`` method, else a newly opened Inference widget."""
        if self.viewer is None:
            return None
        for widget in self.viewer.window.dock_widgets.values():
            if widget is not self and callable(getattr(widget, "use_checkpoint", None)):
                return widget
        try:
            _, widget = self.viewer.window.add_plugin_dock_widget(*INFERENCE)
        except Exception:  # noqa: BLE001 (npe2/napari raise several kinds when a widget is missing)
            return None
        return widget if callable(getattr(widget, "use_checkpoint", None)) else None

    # --- watching ---------------------------------------------------------------------------------

    def _watch(self, job: Job) -> None:
        self.job = job
        self._plotted, self._log = -1, ""
        self._reset_plots()
        self.poll()
        if job.status() == RUNNING:
            self.timer.start()

    def poll(self) -> None:
        """One look at the job: status, progress, curves, log. Stops polling once the job ended."""
        job = self.job
        if job is None:
            return
        state = job.status()
        rows = job.metrics()
        progress = job.progress(read=False)  # of these very rows: bar, text and curves agree
        if progress.fraction is not None:
            self.progress.setRange(0, 1000)
            self.progress.setValue(round(1000 * progress.fraction))
        elif state == RUNNING:
            self.progress.setRange(0, 0)  # busy: the total is unknown
        self.progress.setFormat(progress.describe() if progress.done or progress.total else "starting…")
        if state == RUNNING:
            self._say(f"running: {progress.describe()}" if progress.done else f"running: starting {job.kind}…")
        else:
            self._say(job.message())
        self._plot(rows)
        log = "\n".join(job.log_tail(15))
        if log != self._log:
            self._log = log
            self.log.setPlainText(log)
            self.log.verticalScrollBar().setValue(self.log.verticalScrollBar().maximum())
        self._update_buttons(state)
        if state != RUNNING:
            self.timer.stop()

    def _plot(self, rows: list[dict[str, Any]]) -> None:
        """One line per loss term, against the step (pretrain) or epoch (finetune)."""
        if len(rows) == self._plotted:
            return
        self._plotted = len(rows)
        x_key = "step" if self.job is None or self.job.unit == "step" else "epoch"
        for term in loss_terms(rows):
            points = [(row.get(x_key, i), row[term]) for i, row in enumerate(rows)
                      if isinstance(row.get(term), (int, float))]
            xs, ys = zip(*points) if points else ((), ())
            if term not in self.lines:
                (self.lines[term],) = self.axes.plot(xs, ys, label=term, linewidth=1.2)
                self.axes.legend(loc="upper right", fontsize="small", facecolor=self.axes.get_facecolor(),
                                 labelcolor=self.axes.xaxis.label.get_color())
            else:
                self.lines[term].set_data(xs, ys)
        self.axes.set_xlabel(x_key)
        self.axes.set_ylabel("loss")
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()
        self._plot_curve(rows)

    def _plot_curve(self, rows: list[dict[str, Any]]) -> None:
        """The learning curve: one line per measure against the step, its chance level dashed in its colour."""
        curves = eval_curves(rows)
        if not curves:
            return
        if self._hint is not None:
            self._hint.remove()
            self._hint = None
        legend = False
        for name, curve in curves.items():
            if name not in self.eval_lines:
                color = CURVE_COLOURS[len(self.eval_lines) % len(CURVE_COLOURS)]
                (line,) = self.eval_axes.plot(curve["steps"], curve["values"], marker=".", linewidth=1.2, label=name,
                                              color=color)
                self.eval_lines[name] = line
                self.chance_lines[name] = self.eval_axes.axhline(curve["chance"], linestyle="--", linewidth=0.8,
                                                                 color=line.get_color(), alpha=0.7)
                legend = True
            else:
                self.eval_lines[name].set_data(curve["steps"], curve["values"])
                self.chance_lines[name].set_ydata([curve["chance"]] * 2)
        if legend:
            # Below the plot, not on it: a dozen measures would hide their own points.
            self.eval_axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize="xx-small", ncols=2,
                                  framealpha=0.6,
                                  facecolor=self.eval_axes.get_facecolor(),
                                  labelcolor=self.eval_axes.xaxis.label.get_color())
        self.eval_axes.relim()
        self.eval_axes.autoscale_view()
        self.eval_canvas.draw_idle()

    def _reset_plots(self) -> None:
        """Empty loss and learning-curve plots, in the viewer's theme, the latter with a hint."""
        self.axes.clear()
        self.eval_axes.clear()
        self.lines, self.eval_lines, self.chance_lines = {}, {}, {}
        self.eval_axes.set_xlabel("step")
        self.eval_axes.set_ylabel("score (dashed: chance)")
        self._hint = self.eval_axes.text(0.5, 0.5, NO_CURVE, ha="center", va="center", fontsize="x-small",
                                         transform=self.eval_axes.transAxes, wrap=True)
        for figure, axes in ((self.figure, self.axes), (self.eval_figure, self.eval_axes)):
            self._theme_plot(figure, axes)
        self.canvas.draw_idle()
        self.eval_canvas.draw_idle()

    def _theme_plot(self, figure: Figure, axes: Any) -> None:
        """A plot in the viewer's theme colours (a white figure glares in napari's dark theme)."""
        if self.viewer is None:
            return
        from napari.utils.theme import get_theme

        try:
            theme = get_theme(self.viewer.theme)
        except (KeyError, ValueError):
            return
        back, text = theme.background.as_hex(), theme.text.as_hex()
        figure.set_facecolor(back)
        axes.set_facecolor(back)
        axes.tick_params(colors=text)
        axes.xaxis.label.set_color(text)
        axes.yaxis.label.set_color(text)
        for child in axes.texts:
            child.set_color(text)
        for spine in axes.spines.values():
            spine.set_edgecolor(text)

    def _update_buttons(self, state: str | None) -> None:
        running = state == RUNNING
        self.start_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.use_button.setEnabled(self.job is not None and self.job.latest_checkpoint() is not None)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt naming)
        """Stop watching; the job itself keeps running (re-attach to its folder later)."""
        self.timer.stop()
        super().closeEvent(event)
