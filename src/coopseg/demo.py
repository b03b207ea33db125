"""``coopseg demo``: the whole loop on the embedded data in about five minutes on a CPU."""

from __future__ import annotations

import time

import numpy as np
import torch

from .config import PACKAGED_CONFIGS, load_config
from .engine.checkpoint import load_model
from .engine.inference import predict_probs
from .visualize import save_grid

DEMO_CONFIG = PACKAGED_CONFIGS / "demo.yaml"


def run_demo(out_dir: str = "runs", overrides: list[str] | None = None, grid_rows: int = 6) -> dict:
    """Train the demo config, evaluate its best checkpoint, draw a grid, write the HTML
    report; return the metrics."""
    from .engine.evaluate import evaluate_checkpoint
    from .engine.train import train

    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(DEMO_CONFIG, [f"out_dir={out_dir}", f"name=demo-{stamp}", *(overrides or [])])
    print(f"coopseg demo: run folder {cfg.run_dir}")
    result = train(cfg)
    best = result.run_dir / "checkpoints" / "best.safetensors"
    model, _, info = load_model(best)
    report = evaluate_checkpoint(cfg, model, best, result.run_dir / "metrics.json")

    from .data import build_dataset

    val_set = build_dataset(cfg.data, "val")
    images, targets, preds = [], [], []
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    for i in range(min(grid_rows, len(val_set))):
        x, y = val_set[i]
        model_device = next(model.parameters()).device
        pred = predict_probs(model, x[None].to(model_device)).argmax(1)[0].cpu().numpy()
        rgb = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        images.append(rgb)
        targets.append(y.numpy().astype(np.uint8))
        preds.append(pred.astype(np.uint8))
    grid = save_grid(result.run_dir / "predictions.png", images, targets, preds, info["palette"])
    print(f"image | ground truth | prediction grid: {grid}")
    from .report import write_report

    page = write_report(
        result.run_dir,
        checkpoint=best,
        metrics_path=result.run_dir / "metrics.json",
        device=cfg.device,
    )
    print(f"report (open in a browser): {page}")
    return report
