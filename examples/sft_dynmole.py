"""Train a DynMoLE adapter (Tsallis-entropy hybrid routing) with TRL's SFTTrainer on the synthetic tasks, save,
reload, and print accuracy and the routers' statistics (entropy, broadcast share, experts per token, load).

Same options as sft_mixlora.py but --method and --top-k (DynMoLE picks a number of experts per token), e.g.
`python examples/sft_dynmole.py --model Qwen/Qwen2.5-0.5B --dataset d.jsonl`.
"""

from sft_mixlora import main

if __name__ == "__main__":
    main(method="dynmole", description=__doc__)
