"""Model cards for peft-mole adapters: what `save_pretrained` and `peft_mole.push_to_hub` write into README.md.

Note: transformers' `model.push_to_hub` (which PeftModel inherits) replaces README.md with the card already on the
Hub, or a generic template, after saving — PEFT's card and ours are lost that way. `peft_mole.push_to_hub(model,
repo_id)` uploads the folder `save_pretrained` writes, card included.

PEFT writes its card first (library `peft`, base model, PEFT version); then the adapter config's own
`save_pretrained` (ours) adds tags `peft`, `peft-mole` and the method name, and a section between
`<!-- peft-mole -->` markers (replaced on every save): the method, the settings that define it, router
statistics of the last recorded forward pass (training, or a forward with labels), and an evaluation table when
`add_eval_results` was called.
"""

from __future__ import annotations

import json
import os

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from peft import LoraConfig

START, END = "<!-- peft-mole -->", "<!-- /peft-mole -->"
# Every setting that changes what the adapter computes or how it trained; a method lists those it has.
CARD_FIELDS = ("num_experts", "top_k", "q", "top_p", "broadcast_threshold", "min_experts", "renormalize",
               "router_scope", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "expert_target_modules",
               "attn_target_modules", "attn_r", "attn_lora_alpha", "attn_lora_dropout", "layers_to_transform",
               "jitter_noise", "router_aux_loss_coef", "entropy_loss_coef", "lb_loss_coef", "modules_to_save")
METHOD_NAMES = {"MixLoRAConfig": "MixLoRA", "DynMoLEConfig": "DynMoLE"}
PEFT_TYPE_NAMES = {"PEFT_MOLE_MIXLORA": "MixLoRA", "PEFT_MOLE_DYNMOLE": "DynMoLE", "LORA": "LoRA"}


def add_eval_results(model, results: dict[str, dict[str, float]]) -> None:
    """Attach {adapter: {task: accuracy}} (as `evaluate_commonsense` returns) to the adapters' cards.

    The key "model" (what `evaluate_commonsense` returns with `adapters=None`: the model as it ran) stands for the
    model's active adapter, unless an adapter is named "model"; with several active adapters it is ambiguous, a
    ValueError asking to name the adapter. Example:
    `add_eval_results(model, evaluate_commonsense(model, tokenizer, tasks))`.
    """
    for adapter, scores in results.items():
        if adapter == "model" and adapter not in model.peft_config:
            active = list(model.active_adapters)
            if len(active) != 1:
                raise ValueError(f"results key 'model' is the model with active adapters {active}: "
                                 f"key the scores by one adapter of {sorted(model.peft_config)} instead")
            adapter = active[0]
        config = model.peft_config.get(adapter)
        if config is None:
            raise ValueError(f"unknown adapter {adapter!r}; adapters: {sorted(model.peft_config)}")
        config.__dict__["_card_eval"] = dict(scores)


def section(config) -> str:
    method = METHOD_NAMES.get(type(config).__name__, type(config).__name__)
    lines = [START, f"## {method} adapter (peft-mole)", "",
             f"A {method} adapter made with [peft-mole](https://pypi.org/project/peft-mole/). Load it with:", "",
             "```python", "import peft_mole  # registers the adapter type with PEFT",
             "from peft import AutoPeftModelForCausalLM",
             "model = AutoPeftModelForCausalLM.from_pretrained(\"<this repo>\")", "```", "",
             "| setting | value |", "|---|---|"]
    if config.base_model_name_or_path:
        lines.append(f"| base model | `{config.base_model_name_or_path}` |")
    for name in CARD_FIELDS:
        if hasattr(config, name):
            lines.append(f"| {name} | `{getattr(config, name)}` |")
    stats = _last_router_stats(config)
    if stats:
        lines += ["", "### Router statistics", "",
                  "| layer | normalised entropy | broadcast share | experts per token | expert load |",
                  "|---|---|---|---|---|"]
        for layer, s in sorted(stats.items()):
            load = " ".join(f"{x:.2f}" for x in s.load)
            lines.append(f"| {layer} | {s.entropy:.3f} | {s.broadcast:.3f} | {s.experts_per_token:.2f} | {load} |")
    evaluation = _evaluation(config)
    if evaluation:
        lines += ["", *evaluation]
    lines.append(END)
    return "\n".join(lines)


def _evaluation(config) -> list[str]:
    """The card's evaluation table: the scores `add_eval_results` attached to `config` (none: no lines)."""
    scores = config.__dict__.get("_card_eval")
    if not scores:
        return []
    return ["### Evaluation", "", "| task | accuracy |", "|---|---|",
            *(f"| {task} | {value:.4f} |" for task, value in scores.items())]


def _last_router_stats(config) -> dict:
    tuner_ref = config.__dict__.get("_tuner_ref")
    tuner = tuner_ref() if tuner_ref is not None else None
    if tuner is None:
        return {}
    adapter = next((name for name, c in tuner.peft_config.items() if c is config), None)
    return {} if adapter is None else {layer: s for (_, layer), s in tuner.router_stats({adapter}).items()}


def update_model_card(directory: str, config) -> None:
    """Create or update README.md in `directory` with the tags and the peft-mole section of `config` (a plain
    LoRA config, a multi-job LoRA job's: PEFT's metadata and tags, and the evaluation table where `add_eval_results`
    gave it scores; before 2026-12-08 a LoRA job's scores were dropped)."""
    method = "lora" if isinstance(config, LoraConfig) else METHOD_NAMES.get(type(config).__name__,
                                                                           type(config).__name__).lower()
    if method != "lora":
        text = section(config)
    else:
        evaluation = _evaluation(config)
        text = "\n".join([START, *evaluation, END]) if evaluation else None
    _write_card(directory, {"peft", "peft-mole", method}, config.base_model_name_or_path,
                None if text is None else (START, END, text))


def _write_card(directory: str, tags: set[str], base_model: str | None,
                section_text: tuple[str, str, str] | None) -> None:
    """README.md in `directory` (PEFT's card, or a template) with library `peft`, `tags` added, the base model where
    the card names none, and `section_text` (start marker, end marker, text from marker to marker) put in place of
    its last version, or before the card's text."""
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | tags)
    if base_model and not card.data.get("base_model"):
        card.data["base_model"] = base_model
    if section_text is not None:
        start, end, text = section_text
        if start in card.text and end in card.text:
            card.text = card.text[: card.text.index(start)] + text + card.text[card.text.index(end) + len(end):]
        else:
            card.text = text + "\n\n" + card.text
    card.save(path)


LIST_START, LIST_END = "<!-- peft-mole adapters -->", "<!-- /peft-mole adapters -->"


def list_subfolder_adapters(folder: str) -> None:
    """Name the adapters that `save_pretrained` put in subfolders (every adapter but "default") on the root card,
    between their own markers, with the line that loads each: the Hub shows the root README.md only, and without
    a "default" adapter (`selected_adapters=["other"]`) it held PEFT's template alone."""
    names = sorted(name for name in os.listdir(folder)
                   if os.path.isfile(os.path.join(folder, name, "adapter_config.json")))
    if not names:
        return
    lines = [LIST_START, "## Adapters in subfolders", "", "| adapter | method | load |", "|---|---|---|"]
    for name in names:
        with open(os.path.join(folder, name, "adapter_config.json")) as file:
            peft_type = json.load(file).get("peft_type", "?")
        method = PEFT_TYPE_NAMES.get(peft_type, peft_type)
        lines.append(f"| `{name}` | {method} | `PeftModel.from_pretrained(base, \"<this repo>\", "
                     f"subfolder=\"{name}\")` |")
    lines.append(LIST_END)
    _write_card(folder, {"peft", "peft-mole"}, None, (LIST_START, LIST_END, "\n".join(lines)))


def is_hub_repo_id(name) -> bool:
    """Whether `name` can name a Hub repository ("org/model"), not a local folder: the Hub refuses a card whose
    `base_model` is anything else. A folder path, or a name that is a model folder here (with its config.json, which
    `from_pretrained` would have loaded instead of the Hub's), is local; a bare "gpt2" beside an unrelated folder of
    that name is not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if (not isinstance(name, str) or os.path.isabs(name) or name.startswith((".", "~"))
            or os.path.isfile(os.path.join(name, "config.json"))):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def drop_local_base_model(path: str) -> None:
    """Remove a base model that is a local folder (a base loaded from disk: PEFT writes its `_name_or_path`) from
    the card at `path`, with the `base_model:...` tags naming it; a Hub id stays."""
    card = ModelCard.load(path)
    base = card.data.get("base_model")
    bases = [base] if isinstance(base, str) else list(base or [])
    local = [b for b in bases if not is_hub_repo_id(b)]
    if not local:
        return
    kept = [b for b in bases if b not in local]
    card.data["base_model"] = (kept[0] if len(kept) == 1 else kept) or None
    card.data["tags"] = [t for t in card.data.get("tags") or []
                         if not (t.startswith("base_model:") and any(t.endswith(":" + b) for b in local))]
    card.save(path)


def push_to_hub(model, repo_id: str, commit_message: str = "Upload peft-mole adapter", private: bool | None = None,
                token: str | None = None, revision: str | None = None, create_pr: bool = False, **save_kwargs) -> str:
    """Save `model` (a PeftModel) with its model card into a temporary folder and upload it to `repo_id`. Adapters
    saved in subfolders (all but "default") are listed on the root card (`list_subfolder_adapters`). A base model
    loaded from a local folder is left off the cards (`drop_local_base_model`): the Hub refuses a card whose
    `base_model` is not a repository id.

    `revision` commits to that branch, created from main if it does not exist yet (as PEFT and transformers do);
    `create_pr=True` opens a pull request instead of committing to the branch. Other keyword arguments go to
    `model.save_pretrained` and must be among its parameters (or `state_dict`): any other name (a typo such as
    `privat=True`) is a TypeError naming it, never silently dropped; `safe_serialization=False` (a pickle upload)
    is a ValueError. Returns the commit URL (the pull request's with `create_pr`).
    Example: `peft_mole.push_to_hub(model, "me/my-mixlora", private=True, revision="v1")`.
    """
    import inspect
    import tempfile

    parameters = inspect.signature(model.save_pretrained).parameters
    allowed = sorted({name for name, p in parameters.items() if name != "save_directory"
                      and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} | {"state_dict"})  # PEFT reads **kwargs
    unknown = sorted(set(save_kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"push_to_hub got unexpected keyword argument(s) {unknown}; allowed: commit_message, private, "
                        f"token, revision, create_pr and save_pretrained's {allowed}")
    if save_kwargs.get("safe_serialization", True) is not True:
        raise ValueError(f"push_to_hub uploads safetensors only; got safe_serialization="
                         f"{save_kwargs['safe_serialization']!r}, which would upload a pickle adapter_model.bin that "
                         "peft-mole refuses to load (allowed: True, the default)")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        list_subfolder_adapters(folder)
        for root, _, names in os.walk(folder):
            if "README.md" in names:
                drop_local_base_model(os.path.join(root, "README.md"))
        operations = [
            CommitOperationAdd(path_in_repo=os.path.relpath(os.path.join(root, name), folder),
                               path_or_fileobj=os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names
        ]
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision,
                                   create_pr=create_pr)
    return (getattr(commit, "pr_url", None) if create_pr else None) or commit.commit_url
