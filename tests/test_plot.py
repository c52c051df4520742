"""Loss curves as pictures: training redraws loss.png at every evaluation, `randygpt plot`
draws one run or compares several; the PNGs are opened and their pixels checked."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clitools import assert_one_line_error
from randygpt import plot
from randygpt.config import ModelConfig, TrainConfig
from randygpt.errors import UserError
from randygpt.runs import plan_run
from randygpt.train import train

matplotlib = pytest.importorskip("matplotlib")      # the plots extra (in the test extra)
from matplotlib.image import imread  # noqa: E402

TEXT = "to be or not to be, that is the question. " * 60
BATCH, BLOCK = 8, 16


def tiny(**kw):
    m = ModelConfig(block_size=BLOCK, n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    t = TrainConfig(iters=60, batch_size=BATCH, lr=3e-3, warmup=5, eval_interval=15,
                    eval_iters=2, seed=3)
    for k, v in kw.items():
        setattr(m if hasattr(m, k) else t, k, v)
    return m, t


def run_tiny(out, log=lambda *a: None, **kw):
    return train(plan_run(*tiny(**kw), text=TEXT, out_dir=str(out)), backend="reference",
                 sample_tokens=0, log=log)


def rgb(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])


def shows(image, xy, colour, radius=3, tol=0.1):
    """Some pixel within `radius` of xy (column, row) has `colour` (each channel within tol)."""
    x, y = int(round(xy[0])), int(round(xy[1]))
    patch = image[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1, :3]
    return bool((np.abs(patch - rgb(colour)).max(axis=-1) < tol).any())


def along(points, n=8):
    """n points on each straight segment between consecutive points (linear axes)."""
    t = np.linspace(0, 1, n, endpoint=False)[:, None]
    p = np.asarray(points, float)
    return [tuple(q) for a, b in zip(p, p[1:]) for q in a + t * (b - a)] + [tuple(p[-1])]


def where(fig, ax, points):
    """Pixel (column, row) of data points on `ax` in the PNG of `fig` (rows count down)."""
    fig.draw_without_rendering()            # the layout the PNG was saved with
    height = fig.get_size_inches()[1] * fig.dpi
    return [(x, height - y) for x, y in ax.transData.transform(np.asarray(points, float))]


@pytest.fixture(autouse=True)
def drawing_on(monkeypatch):
    """The suite turns redrawing off (tests/conftest.py); here it is what is tested."""
    monkeypatch.delenv("RANDYGPT_NO_PLOT", raising=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of different learning rates; the first records loss.png after every redraw."""
    root = tmp_path_factory.mktemp("runs")
    pictures, draw = [], plot.write_run_picture

    def recording(run, out=None):
        path = draw(run, out)
        pictures.append((len(plot.read_metrics(run)), imread(path)))
        return path
    with pytest.MonkeyPatch.context() as drawing:      # (the autouse fixture is per test)
        drawing.delenv("RANDYGPT_NO_PLOT", raising=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(plot, "write_run_picture", recording)
            run_tiny(root / "fast")
        run_tiny(root / "slow", lr=5e-4)
    return root / "fast", root / "slow", pictures


def test_the_picture_shows_train_val_and_lr_where_the_metrics_put_them(runs):
    fast, _, _ = runs
    rows = [json.loads(line) for line in (fast / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [15, 30, 45, 60]
    # tokens seen: every row of this text is a full block of targets (no padding)
    assert [r["tokens"] for r in rows] == [r["iter"] * BATCH * BLOCK for r in rows]
    image = imread(fast / "loss.png")
    assert image.shape[:2] == (500, 900)
    fig = plot.draw_run(rows, "fast")
    ax, lr_ax = fig.axes[:2]
    val = where(fig, ax, [(r["iter"], r["val_loss"]) for r in rows])
    for xy in val:
        assert shows(image, xy, plot.VAL_COLOUR), xy
    # val is drawn over train: a train point within a marker of its val point is hidden
    train = [xy for xy, v in zip(where(fig, ax, [(r["iter"], r["train_loss"]) for r in rows]),
                                 val) if abs(xy[1] - v[1]) > 8]
    assert len(train) >= 2
    for xy in train:
        assert shows(image, xy, plot.TRAIN_COLOUR), xy
    # the LR line is drawn behind the losses: its points not under a loss marker
    losses = val + where(fig, ax, [(r["iter"], r["train_loss"]) for r in rows])
    lr = [xy for xy in where(fig, lr_ax, [(r["iter"], r["lr"]) for r in rows])
          if min(np.hypot(xy[0] - x, xy[1] - y) for x, y in losses) > 8]
    assert len(lr) >= 2
    for xy in lr:
        assert shows(image, xy, plot.LR_COLOUR, tol=0.2), xy     # a thin, smoothed line
    # the loss fell (3.0 -> ~1.4): at the last iteration nothing is drawn at the first loss
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    (high,) = where(fig, ax, [(rows[-1]["iter"], rows[0]["val_loss"])])
    assert not shows(image, high, plot.VAL_COLOUR) and not shows(image, high, plot.TRAIN_COLOUR)
    # and without the metrics' help: in the plot area, the val colour's pixels sit higher
    # (smaller rows) in its left quarter than in its right quarter
    (x0, y0), (x1, y1) = where(fig, ax, [ax.get_xlim()[0:1] + ax.get_ylim()[1:2],
                                         ax.get_xlim()[1:2] + ax.get_ylim()[0:1]])
    area = image[int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2, :3]
    ys, xs = np.nonzero(np.abs(area - rgb(plot.VAL_COLOUR)).max(axis=-1) < 0.1)
    quarter = area.shape[1] / 4
    assert ys[xs < quarter].mean() < ys[xs > 3 * quarter].mean() - 50


def test_loss_png_is_redrawn_at_every_evaluation_with_the_points_so_far(runs):
    fast, _, pictures = runs
    rows = plot.read_metrics(fast)
    assert [n for n, _ in pictures] == [1, 2, 3, 4]      # one redraw per evaluation, after it
    for n, image in pictures:
        fig = plot.draw_run(rows[:n], "fast")
        for xy in where(fig, fig.axes[0], [(r["iter"], r["val_loss"]) for r in rows[:n]]):
            assert shows(image, xy, plot.VAL_COLOUR), (n, xy)
    assert all(not np.array_equal(a, b) for (_, a), (_, b) in zip(pictures, pictures[1:]))


def test_a_resumed_run_counts_tokens_on_from_its_checkpoint(tmp_path):
    whole = run_tiny(tmp_path / "whole", iters=40, eval_interval=20)
    train(plan_run(*tiny(iters=40, eval_interval=20), text=TEXT, out_dir=str(tmp_path / "cut")),
          backend="reference", sample_tokens=0, log=lambda *a: None, stop_after=30)
    train(plan_run({"iters": 40}, resume="", out_dir=str(tmp_path / "cut"), text=TEXT),
          backend="reference", sample_tokens=0, log=lambda *a: None)
    cut = plot.read_metrics(tmp_path / "cut")
    assert [(r["iter"], r["tokens"]) for r in cut] == [(20, 20 * 128), (40, 40 * 128)]
    assert [r["tokens"] for r in whole.history] == [r["tokens"] for r in cut]


def cli(*args, cwd=None, prelude=""):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    code = prelude + "import sys; from randygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env=env)


def test_plot_of_two_runs_shows_each_in_its_colour(runs, tmp_path):
    fast, slow, _ = runs
    r = cli("plot", fast, slow, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {plot.COMPARISON}\n"
    image = imread(tmp_path / plot.COMPARISON)
    both = [(n, plot.read_metrics(p)) for n, p in (("fast", fast), ("slow", slow))]
    fig = plot.draw_runs(both)
    for (_, rows), colour in zip(both, plot.RUN_COLOURS):
        # along each run's lines: val solid (everywhere), train dashed (in most places)
        for key, least in (("val_loss", 1.0), ("train_loss", 0.5)):
            line = where(fig, fig.axes[0], along([(r["iter"], r[key]) for r in rows]))
            seen = np.mean([shows(image, xy, colour) for xy in line])
            assert seen >= least, (colour, key, seen)
    # one run: its own loss.png again, the picture training drew (same rows, same pixels)
    copy = tmp_path / "again" / "fast"             # the same name: the same title
    shutil.copytree(fast, copy)
    os.unlink(copy / "loss.png")
    r = cli("plot", copy / "metrics.jsonl")
    assert r.returncode == 0 and r.stdout == f"wrote {copy / 'loss.png'}\n", r.stderr
    assert np.array_equal(imread(copy / "loss.png")[..., :3], imread(fast / "loss.png")[..., :3])


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path):
    fast, _, _ = runs
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "no_rows").mkdir()
    (tmp_path / "no_rows" / "metrics.jsonl").write_text('{"iter": 10, "train_lo')   # torn
    (tmp_path / "garbled.jsonl").write_text('{"iter": 1}\n' + (fast / "metrics.jsonl")
                                            .read_text())
    (tmp_path / "text.txt").write_text("x")
    for args, fragments in (
            ([tmp_path / "nowhere"], ["nowhere", "no such run directory"]),
            ([tmp_path / "empty_dir"], ["empty_dir has no metrics.jsonl"]),
            ([tmp_path / "no_rows"], ["no evaluations yet"]),
            ([tmp_path / "garbled.jsonl"], ["line 1 is not a metrics row"]),
            ([fast, "-o", tmp_path / "pic.jpg"], ["pic.jpg", "ending in .png"]),
            ([fast, "-o", tmp_path], ["ending in .png"]),
            ([fast, fast, "-o", tmp_path / "text.txt" / "x.png"], ["cannot write", "x.png"])):
        r = cli("plot", *args)
        assert r.returncode == 2
        assert_one_line_error(r, "randygpt plot: error:", *fragments)
    r = cli("plot", fast, prelude="import sys; sys.modules['matplotlib'] = None; ")
    assert r.returncode == 2
    assert_one_line_error(r, "matplotlib is not installed", "pip install -e '.[plots]'")


def test_a_torn_last_line_is_skipped(runs, tmp_path):
    fast, _, _ = runs
    torn = tmp_path / "metrics.jsonl"
    torn.write_text((fast / "metrics.jsonl").read_text() + '{"iter": 75, "train_l')
    assert [r["iter"] for r in plot.read_metrics(torn)] == [15, 30, 45, 60]
    with pytest.raises(UserError, match="line 2 is not a metrics row"):
        torn.write_text('{"iter": 1, "train_loss": 1, "val_loss": 1}\n[]\n' + '{"iter": 2, '
                        '"train_loss": 1, "val_loss": 1}\n')
        plot.read_metrics(torn)


@pytest.mark.parametrize("failure", ["no matplotlib", "a drawing error"])
def test_training_goes_on_and_says_once_why_there_is_no_picture(monkeypatch, tmp_path,
                                                               failure):
    if failure == "no matplotlib":        # what `import matplotlib...` does where it is absent
        for name in [n for n in sys.modules if n.startswith("matplotlib.")] + ["matplotlib"]:
            monkeypatch.setitem(sys.modules, name, None)
        expected = ("note: loss.png not drawn: matplotlib is not installed: "
                    "pip install -e '.[plots]'")
    else:
        def broken(rows, name):
            raise RuntimeError("the renderer\nfailed")
        monkeypatch.setattr(plot, "draw_run", broken)
        expected = "note: loss.png not drawn: RuntimeError: the renderer failed"
    lines = []
    r = run_tiny(tmp_path, log=lines.append, iters=30, eval_interval=10)
    assert r.iters_done == 30 and len(r.history) == 3
    assert [line for line in lines if "loss.png" in line] == [expected]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "loss.png").exists()
    assert os.path.exists(tmp_path / "checkpoint.safetensors")


def test_randygpt_no_plot_turns_the_redraw_off(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDYGPT_NO_PLOT", "1")
    run_tiny(tmp_path / "off")
    assert (tmp_path / "off" / "metrics.jsonl").exists()
    assert not (tmp_path / "off" / "loss.png").exists()
