"""Plot curves from a run's ``metrics.jsonl`` to a PNG.

  python experiments/plot_metrics.py runs/cmft/metrics.jsonl docs/cmft_loss.png --keys train/cycle train/g_adv
"""

from __future__ import annotations

import argparse
import json

from cmfl_jax.previews import new_figure, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="metrics.jsonl of a run")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--keys", nargs="+", default=["train/cycle", "train/g_adv", "train/d_a", "train/d_b"])
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    plt, fig, axes = new_figure(1, len(args.keys), size=3.0)
    for ax, key in zip(axes[0], args.keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.axis("on")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    save_figure(plt, fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
