"""``coopseg report``: one self-contained HTML page, opened in headless Chromium: every
image decodes, the tables hold the run's numbers, the console stays clean."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from coopseg.cli import main
from coopseg.engine.checkpoint import load_model
from coopseg.engine.evaluate import evaluate_checkpoint
from coopseg.engine.train import train
from coopseg.report import find_metrics, pct, read_log, write_report

from .conftest import tiny_config
from .test_explain import TINY_ENSEMBLE, save_untrained_run


@pytest.fixture(scope="module")
def tiny_run(tiny_scenes, tmp_path_factory) -> Path:
    """A real run folder: 2 iterations, validated at the end."""
    cfg = tiny_config(
        tiny_scenes,
        tmp_path_factory.mktemp("report"),
        name="tiny-report",
        train={"iterations": 2, "val_interval": 0, "checkpoint_interval": 0, "log_interval": 1},
    )
    return train(cfg, show_progress=False).run_dir


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through the Debian chromium-driver (no download, no network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None or shutil.which("chromium") is None:
        pytest.fail(
            "the report test needs headless Chromium: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


IMAGES_JS = """return Array.from(document.images).map(
    i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, src: i.src.slice(0, 22)}));"""
TABLE_JS = """
const all = sel => Array.from(document.querySelectorAll(sel));
const cells = tr => Array.from(tr.cells).slice(1).map(c => c.textContent.trim());
const rows = {}, totals = {};
for (const tr of all('#iou-table tr[data-class]')) rows[tr.dataset.class] = cells(tr);
for (const tr of all('#iou-table tr[data-total]')) totals[tr.dataset.total] = cells(tr);
return {
    outputs: all('#iou-table th[data-output]').map(t => t.dataset.output),
    rows: rows, totals: totals,
    cards: all('#summary .value').map(e => e.textContent.trim()),
    grid: all('#prediction-grid tr').map(tr => tr.querySelectorAll('img').length),
    owners: all('#attention ~ h3').map(h => h.textContent.trim()),
};"""


def open_page(driver, path: Path) -> dict:
    """Load the page, wait until it and every image finished; return what it shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete)"
        )
    )
    images = driver.execute_script(IMAGES_JS)
    assert images, "the page shows no image"
    broken = [i["alt"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not decode: {broken}"
    assert all(i["src"] == "data:image/png;base64," for i in images)  # self-contained
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    return driver.execute_script(TABLE_JS)


def assert_table_holds(shown: dict, metrics: dict) -> None:
    """The page's per-class table and cards equal the metrics JSON, to the digit."""
    outputs = metrics.get("outputs") or {"out": metrics}
    assert shown["outputs"] == list(outputs)
    for name, entry in metrics["classes"].items():
        ious = [pct(o["classes"][name]["iou"]) for o in outputs.values()]
        gt = f"{entry['gt_pixels']:,}"
        assert shown["rows"][name] == [*ious, pct(entry["acc"]), gt, f"{entry['pred_pixels']:,}"]
    assert shown["totals"]["mIoU"][: len(outputs)] == [pct(o["miou"]) for o in outputs.values()]
    pixel_acc = [pct(o["pixel_acc"]) for o in outputs.values()]
    assert shown["totals"]["pixel acc"][: len(outputs)] == pixel_acc
    assert shown["cards"] == [pct(metrics[k]) for k in ("miou", "pixel_acc", "mean_acc")]


def test_eval_report_opens_in_chromium_with_the_runs_numbers(
    tiny_run, browser, tmp_path, capsys
) -> None:
    start = time.perf_counter()
    ckpt = tiny_run / "checkpoints" / "best.safetensors"
    page, metrics_json = tmp_path / "report.html", tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--json", str(metrics_json), "--report", str(page)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert f"report written to {page}" in capsys.readouterr().out
    shown = open_page(browser, page)
    metrics = json.loads(metrics_json.read_text())
    assert_table_holds(shown, metrics)
    assert shown["grid"] == [0, 4, 4, 4, 4]  # header + 4 val images: image, GT, out, errors
    html = page.read_text()
    assert "<script" not in html and 'id="curves-chart"' in html and 'id="confusion-chart"' in html
    assert "name: tiny-report" in html and str(metrics_json) in html  # config, metrics source
    assert time.perf_counter() - start < 60


def test_report_command_evaluates_when_no_eval_json(tiny_run, tmp_path, capsys) -> None:
    """Without an eval.json for the checkpoint the report evaluates it: same numbers
    as ``coopseg eval``; the run folder gains only the page."""
    before = sorted(p.name for p in tiny_run.rglob("*"))
    out = tmp_path / "page.html"
    assert main(["report", str(tiny_run), "--out", str(out), "--device", "cpu"]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tiny_run.rglob("*")) == before
    ckpt = tiny_run / "checkpoints" / "best.safetensors"
    model, cfg, _ = load_model(ckpt)
    expected = evaluate_checkpoint(cfg, model, ckpt)
    html = out.read_text()
    cells = table_cells(html)
    assert cells["mIoU"][0] == pct(expected["miou"])
    for name, entry in expected["classes"].items():
        assert cells[name][0] == pct(entry["iou"])
    assert "computed for this report" in html
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(u.startswith(("data:", "#")) for u in links), links


def test_cooperative_attention_report_in_chromium(tiny_scenes, browser, tmp_path) -> None:
    """An ensemble of a DANet and a DF-DAM member: fused and both members side by side,
    the members' disagreement, and every attention picture, all decoded."""
    ckpt = save_untrained_run(tiny_scenes, tmp_path, "pair", TINY_ENSEMBLE)
    page = write_report(ckpt.parent.parent, tmp_path / "pair.html", device="cpu", rows=2)
    shown = open_page(browser, page)
    assert sorted(shown["outputs"]) == ["dual", "fused", "pos"]
    assert shown["grid"] == [0, 7, 7]  # image, GT, 3 outputs, errors, who is right
    assert shown["owners"] == ["dual (DF-DAM)", "pos (DANet)"]
    html = page.read_text()
    assert 'id="who-is-right"' in html and "only pos right" in html and "only dual right" in html
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert sum("position attention of pixel" in c for c in captions) == 2 * 3  # 3 queries each
    assert sum("2DPAM confidence" in c for c in captions) == 2


def test_find_metrics_skips_files_for_other_or_older_weights(tmp_path) -> None:
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    saved = run / "checkpoints" / "eval.json"
    saved.write_text(json.dumps({"checkpoint": "x/final.safetensors", "matrix": [[1]]}))
    assert find_metrics(run, ckpt)[0] is None  # another checkpoint's numbers
    saved.write_text(json.dumps({"checkpoint": str(ckpt), "miou": 0.5}))
    assert find_metrics(run, ckpt)[0] is None  # no confusion matrix
    saved.write_text(json.dumps({"checkpoint": str(ckpt), "matrix": [[1]]}))
    assert find_metrics(run, ckpt) == ({"checkpoint": str(ckpt), "matrix": [[1]]}, str(saved))
    os.utime(saved, (1, 1))  # written before the weights changed
    assert find_metrics(run, ckpt)[0] is None


def test_read_log_keeps_the_last_record_of_a_step(tmp_path) -> None:
    log = tmp_path / "log.jsonl"
    lines = [
        {"step": 1, "kind": "train", "loss": 3.0},
        {"step": 2, "kind": "train", "loss": 2.0},
        {"step": 2, "kind": "train", "loss": 1.5},  # a resumed run logs step 2 again
        {"step": 2, "kind": "val", "miou": 0.1},
    ]
    log.write_text("\n".join(map(json.dumps, lines)) + "\n{cut short")
    records = read_log(log)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("val", 2)]
    assert records[1]["loss"] == 1.5


@pytest.mark.slow
def test_demo_writes_the_report(tiny_scenes, tmp_path, capsys) -> None:
    from coopseg.demo import run_demo

    overrides = [
        f"data.root={tiny_scenes}",
        "data.scene_size=64",
        "data.train_scenes=48",
        "data.val_scenes=16",
        "data.crop_size=[64,64]",
        "data.batch_size=4",
        "data.val_batch_size=8",
        "model.pretrained=false",
        "train.schedule=iterations",  # the demo's is time: 265 s
        "train.iterations=2",
        "train.precise_bn_batches=1",
        "device=cpu",
    ]
    run_demo(str(tmp_path), overrides, grid_rows=2)
    printed = capsys.readouterr().out
    found = re.search(r"report \(open in a browser\): (\S+)", printed)
    assert found, printed
    page = Path(found.group(1))
    assert page.is_file() and page.parent.parent == tmp_path
    assert "metrics.json" in page.read_text()  # the demo's own metrics, not re-evaluated


class _Cells(HTMLParser):
    """Cells of ``#iou-table`` rows keyed by ``data-class`` / ``data-total``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.key: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.key = attrs.get("data-class") or attrs.get("data-total")
            if self.key:
                self.rows[self.key] = []
        elif tag == "td" and self.key:
            self.cell = []

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None and self.key:
            self.rows[self.key].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr":
            self.key = None


def table_cells(html: str) -> dict[str, list[str]]:
    """Per row: the cells after the name (IoU per output, acc, pixel counts)."""
    parser = _Cells()
    parser.feed(html)
    return {k: v[1:] for k, v in parser.rows.items()}
