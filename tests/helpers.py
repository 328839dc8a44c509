"""Test helpers: tiny random-init decoders (BENCH.md 'tiny' shape) and ways to adapt them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import torch

import peft_mole
from peft_mole import synthetic

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


def tiny_base(family: str = "llama", seed: int = 0, **overrides):
    return synthetic.random_model(family, "tiny", seed=seed, **overrides)


def one_layer_base(**overrides):
    """`tiny_base` with one decoder layer, for tests that compile a step. Dynamo and AOTAutograd trace each decoder
    layer anew, so a second layer took about 40 % of such a test's time. What crosses layers in a compiled step (the
    context's row jobs, segments and token order, the router records, each layer's recompiles) stays checked on two
    layers: in the eager tests, and in at least one compiled test of each path left on `tiny_base` (each says so)."""
    return tiny_base(num_hidden_layers=1, **overrides)


def randomize_adapters(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every trainable tensor a random value (B = 0 at init would hide bugs in the expert path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def mixlora(**overrides) -> peft_mole.MixLoRAConfig:
    settings = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0)
    settings.update(overrides)
    return peft_mole.MixLoRAConfig(**settings)


def batch(batch_size: int = 2, seq_len: int = 12, vocab: int = 512, pad_last: int = 0, seed: int = 0):
    """input_ids, attention_mask (the last `pad_last` positions of row 0 are right padding), labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    if pad_last:
        ids[0, -pad_last:] = 0
        mask[0, -pad_last:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def dynmole(**overrides) -> peft_mole.DynMoLEConfig:
    settings = dict(num_experts=4, r=4, lora_alpha=8, lora_dropout=0.0)
    settings.update(overrides)
    return peft_mole.DynMoLEConfig(**settings)


# One entry per adapter type: every PEFT-contract test runs on each.
METHODS = {
    "mixlora": mixlora,
    "mixdora": lambda **kw: mixlora(use_dora=True, **kw),
    "dynmole": dynmole,
    "dynmole-projection": lambda **kw: dynmole(router_scope="projection", **kw),
}


def compile_config(backend):
    """`generate`'s compile options for one graph per decoding step (`fullgraph=True`) with `backend`, on the CPU too."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=backend, mode="default")
    config._compile_all_devices = True  # transformers compiles `generate` on accelerators only, unless told so
    return config


def recording_backend(graphs: list):
    """A torch.compile backend that appends each graph it is given to `graphs` and runs it as traced."""

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend


def count_row_norms(monkeypatch) -> list:
    """A list that gains one entry per evaluation of MixDoRA's expert row norms (`ExpertLoRA`'s `row_norms`)."""
    from peft_mole.tuners.mixlora import experts as experts_module

    calls = []
    original = experts_module.row_norms

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(experts_module, "row_norms", counted)
    return calls


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs scripts as `python <script> <args>` (or `python -m <module> <args>`) runs them: as __main__, with their argv,
# working directory and sys.path[0] (the script's folder; for a module, the working directory), one after another
# in one process, so that the imports (~7 s) are paid once. Between runs Dynamo is reset, and its, inductor's and
# torch.compiler's settings, the environment and sys.path are put back, so that no run takes what an earlier one set.
_SCRIPT_RUNNER = textwrap.dedent("""
    import contextlib, io, json, os, runpy, sys, traceback
    import torch
    import torch._inductor.config as inductor_config
    import torch.compiler.config as compiler_config
    configs = (torch._dynamo.config, inductor_config, compiler_config)  # (inductor's leaves out its aliases of the
    settings = [config.save_config() for config in configs]  # compiler's, such as force_disable_caches)
    environ, path = dict(os.environ), list(sys.path)
    for key, (module, target, args, cwd) in json.loads(sys.argv[1]).items():
        sys.argv, out, err, error = [target, *args], io.StringIO(), io.StringIO(), None
        os.chdir(cwd)
        sys.path[0] = cwd if module else os.path.dirname(os.path.abspath(target))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_module(target, run_name="__main__") if module else runpy.run_path(target, run_name="__main__")
        except SystemExit as stop:
            error = None if stop.code in (0, None) else f"exit status {stop.code}: {err.getvalue()[-2000:]}"
        except BaseException:  # noqa: BLE001 - reported by the run's test
            error = traceback.format_exc()[-3000:]
        torch._dynamo.reset()
        for config, saved in zip(configs, settings):
            config.load_config(saved)
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        print(json.dumps({"run": key, "stdout": out.getvalue(), "error": error}), flush=True)
""")


def run_in_one_process(plan: dict[str, tuple[bool, str, list[str], str]], **run_kwargs) -> dict[str, dict]:
    """Run each of `plan`'s {key: (is a module, script path or module name, args, working directory)} in one fresh
    process (`_SCRIPT_RUNNER`); returns {key: {"stdout": what it printed, "error": None, its traceback or its exit
    status}}. `run_kwargs` go to `subprocess.run` (cwd, env, timeout)."""
    result = subprocess.run([sys.executable, "-c", _SCRIPT_RUNNER, json.dumps(plan)], capture_output=True,
                            text=True, **{"timeout": 1200, **run_kwargs})
    done = {run["run"]: run for run in (json.loads(line) for line in result.stdout.splitlines()
                                        if line.startswith('{"run"'))}
    assert list(done) == list(plan), f"the runner stopped after {list(done)}: {result.stderr[-3000:]}"
    assert result.returncode == 0, result.stderr[-3000:]  # (what fails at exit: threads, atexit)
    return done
