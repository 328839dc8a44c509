"""Render the README's benchmark table from the newest bench/results/*.jsonl (no hand-copied numbers).

Usage: python bench/render_table.py [results.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMMANDS = {
    "mixlora_vs_lora": "python bench/mixlora_vs_lora.py --shape {shape} --dropout {dropout}",
    "dynmole_vs_mixlora": "python bench/dynmole_vs_mixlora.py --shape {shape}",
}
DESCRIPTIONS = {
    "mixlora_vs_lora": "MixLoRA step / PEFT LoRA step (fwd+bwd+AdamW), dropout {dropout}",
    "dynmole_vs_mixlora": "DynMoLE step / MixLoRA top-2 step, routers {router_state} "
                          "({dynmole_experts_per_token:.2f} experts/token)",
}


def main() -> None:
    results = Path(__file__).parent / "results"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else max(results.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    device = next((r["device"] for r in rows if "device" in r), "?")
    print(f"Source: `bench/results/{path.name}` (device: {device}, torch {rows[0].get('torch', '?')})\n")
    print("| ratio | shape | value (median) | value (min) | command |")
    print("|---|---|---|---|---|")
    for row in rows:
        if row["name"] in COMMANDS:
            command = COMMANDS[row["name"]].format(**row)
            description = DESCRIPTIONS[row["name"]].format(**row)
            print(f"| `{row['name']}`: {description} | {row['shape']} | {row['ratio_median']:.2f}× "
                  f"| {row['ratio_min']:.2f}× | `{command}` |")


if __name__ == "__main__":
    main()
