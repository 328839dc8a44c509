"""Run lm-evaluation-harness on peft-mole adapters: `python -m peft_mole.lm_eval <lm_eval arguments>`.

lm-eval's `hf` model loads an adapter with `PeftModel.from_pretrained` when given `peft=<path or hub id>`; PEFT
only knows MixLoRA/DynMoLE once `peft_mole` is imported, which this entry point does before handing over to
lm-eval's own command line, unchanged:

    python -m peft_mole.lm_eval --model hf \\
        --model_args pretrained=Qwen/Qwen2.5-0.5B,peft=runs/code --tasks arc_easy,boolq --batch_size 8

From Python, `import peft_mole` before `lm_eval.simple_evaluate(model="hf", model_args={..., "peft": path})`.
Nothing trains during an evaluation, so the command runs inside `peft.helpers.DoraCaching()`: DoRA experts (and
PEFT's DoRA) compute their weight norms once instead of at every forward.
"""

from __future__ import annotations

import peft_mole  # noqa: F401  (registers the PEFT types lm-eval's PeftModel.from_pretrained will meet)


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval") from error
    from peft.helpers import DoraCaching

    with DoraCaching():
        cli_evaluate()


if __name__ == "__main__":
    main()
