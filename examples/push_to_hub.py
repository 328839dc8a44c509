"""Save a MixLoRA adapter with its model card and push it to the Hugging Face Hub, then pull it back.

Without `--repo-id` it is a dry run (offline): it writes the folder that would be uploaded —
adapter_config.json, adapter_model.safetensors and README.md with the peft-mole section — and loads it back from
disk. The dry run's card shows a placeholder evaluation row (`demo_task`) to show where scores go; it is never
put on a pushed card. With `--repo-id me/my-mixlora` (and a token from `hf auth login`) it uploads with
`peft_mole.push_to_hub` and loads the adapter back from the Hub id.

The adapter's weights are random (a fresh adapter has B = 0 and computes exactly the base model), so "logits
identical" after loading back checks that the adapter's own weights made the round trip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_mole
from peft_mole import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model: hub id or path (default: a tiny random Llama)")
    parser.add_argument("--repo-id", help="Hub repository to push to; without it, a dry run")
    parser.add_argument("--output-dir", default="build/demo-push")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    out = Path(args.output_dir)
    if args.model is None:
        tokenizer = synthetic.demo_tokenizer(save_dir=out / "base")
        synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer)).save_pretrained(out / "base")
        args.model = str(out / "base")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), peft_mole.MixLoRAConfig(num_experts=4))
    with torch.no_grad():  # random expert weights (B != 0), so the adapter changes the logits
        generator = torch.Generator().manual_seed(0)  # one stream: every tensor different, so a swap would show
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1, generator=generator)
    batch = tokenizer(["Capital of Peru?\nAnswer: Lima"], return_tensors="pt")
    model.train()
    model(**batch, labels=batch["input_ids"])  # a forward with labels: its router statistics go on the card
    model.eval()
    if args.repo_id is None:
        peft_mole.add_eval_results(model, {"default": {"demo_task": 1.0}})  # placeholder: dry run only
        model.save_pretrained(out / "adapter")
        source = str(out / "adapter")
        print(f"dry run: wrote {sorted(p.name for p in (out / 'adapter').iterdir())} to {source}")
        print((out / "adapter" / "README.md").read_text().split("<!-- peft-mole -->")[1][:400])
    else:
        print(peft_mole.push_to_hub(model, args.repo_id, private=args.private))
        source = args.repo_id
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), source).eval()
    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
        same = torch.equal(logits, again(**batch).logits)
    print(f"the adapter changes the logits: {not torch.equal(logits, base_logits)}")
    print(f"loaded back from {source}: logits identical = {same}")


if __name__ == "__main__":
    main()
