"""Merge speed and memory: mergeme against mergekit-moe and against the I/O floor.

One command from a fresh clone (Python 3.11 with mergeme's requirements installed):

    python benchmarks/merge_speed.py [--sizes small,large] [--runs 3] [--workdir DIR]

It writes synthetic Llama checkpoints with random bf16 weights (a base and 4 experts per
size), installs mergekit 0.1.5 into a venv of its own inside the work folder (reused when
present), then, ``--runs`` times in turn, measures:

- the I/O floor: read every byte of the input weight files once, write the output's bytes once;
- ``mergekit-moe`` with a random gate (the same experts, bf16 output);
- ``mergeme`` with the trunk methods ``base``, ``average``, ``ties`` and ``dare_ties``.

Each merge runs as a separate process; its peak RSS is that of the whole process tree,
polled every 50 ms. The table shows medians over the runs. Every measurement reads inputs
that the system has in its page cache (they were just written or read), so the numbers are
warm-cache numbers for all tools alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MERGEKIT_VERSION = "0.1.5"
METHODS = ("base", "average", "ties", "dare_ties")
NUM_EXPERTS = 4
# what a merge imports (it builds the MoE config without transformers)
STARTUP_IMPORTS = "import mergeme.merge.moe_builder"

# Llama shapes giving about 300 MB and about 2 GB of bf16 weights per checkpoint
SIZES = {
    "small": dict(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8, vocab=32000),
    "large": dict(hidden=2048, intermediate=5632, layers=18, heads=16, kv_heads=8, vocab=32000),
}


@dataclass
class Measurement:
    wall_s: float
    peak_rss_bytes: int


def tensor_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint of these dimensions, by name."""
    hidden, inter, kv = size["hidden"], size["intermediate"], size["kv_heads"]
    kv_width = kv * hidden // size["heads"]
    shapes = {"model.embed_tokens.weight": (size["vocab"], hidden)}
    for layer in range(size["layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (hidden, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_width, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_width, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, hidden),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
            f"{prefix}.mlp.up_proj.weight": (inter, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (size["vocab"], hidden)}
    return shapes


def write_synthetic_llama(folder: Path, size: dict, seed: int) -> None:
    """A Llama checkpoint of random bf16 weights, in 1 GB shards with an index."""
    import torch
    from transformers import LlamaConfig

    from mergeme.io.safetensors_writer import CheckpointWriter, TensorSpec

    folder.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.to_json_file(folder / "config.json")
    shapes = tensor_shapes(size)
    specs = [TensorSpec(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    writer = CheckpointWriter(folder, specs, max_shard_size=1024**3)
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        writer.write(spec.name, (torch.randn(spec.shape, generator=generator) * 0.02).bfloat16())
    writer.close()
    write_tokenizer(folder)


def write_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer: mergekit-moe loads the base's tokenizer unconditionally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "text": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in weight_files(folder))


def measure(command: list[str], log: Path) -> Measurement:
    """Run ``command``; its wall time and the peak RSS of its whole process tree.

    Raises:
        RuntimeError: the command failed; the message holds the end of its log.
    """
    import psutil

    with open(log, "w") as output:
        start = time.perf_counter()
        process = psutil.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            total = 0
            try:
                for member in [process, *process.children(recursive=True)]:
                    total += member.memory_info().rss
            except psutil.Error:
                pass  # a process ended between listing and reading
            peak = max(peak, total)
            time.sleep(0.05)
        wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{tail}")
    return Measurement(wall, peak)


def io_floor(inputs: list[Path], output_bytes: int, scratch: Path) -> Measurement:
    """Read every input weight byte once and write ``output_bytes`` once (64 MB blocks)."""
    block = bytearray(64 * 1024**2)
    start = time.perf_counter()
    for folder in inputs:
        for file in weight_files(folder):
            with open(file, "rb", buffering=0) as stream:
                while stream.readinto(block):
                    pass
    with open(scratch, "wb", buffering=0) as stream:
        left = output_bytes
        while left > 0:
            left -= stream.write(memoryview(block)[: min(len(block), left)])
    wall = time.perf_counter() - start
    scratch.unlink()
    return Measurement(wall, 0)


def install_mergekit(workdir: Path) -> Path:
    """mergekit in a venv of its own (torch from the local CPU wheel when pip offers one)."""
    venv = workdir / "mergekit-venv"
    command = venv / "bin" / "mergekit-moe"
    if command.exists():
        return command
    print(f"installing mergekit {MERGEKIT_VERSION} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # the CPU build of the torch that mergeme uses; mergekit accepts it
    subprocess.run([*pip, "torch==2.13.0+cpu"], check=False)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}", "torch==2.13.0+cpu"], check=True)
    return command


def mergekit_command(mergekit: Path, base: Path, experts: list[Path], out: Path) -> list[str]:
    import yaml

    config = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "bfloat16",
        "experts": [{"source_model": str(e), "positive_prompts": ["text"]} for e in experts],
    }
    config_file = out.parent / f"{out.name}.yml"
    config_file.write_text(yaml.safe_dump(config))
    return [
        str(mergekit),
        str(config_file),
        str(out),
        "--i-understand-this-is-not-useful-without-training",
        "--no-copy-tokenizer",
    ]


def mergeme_command(base: Path, experts: list[Path], out: Path, method: str) -> list[str]:
    spec = json.dumps({"base": str(base), "experts": [str(e) for e in experts], "method": method})
    return [sys.executable, str(Path(__file__).resolve()), "--merge-once", spec, str(out)]


def merge_once(spec_json: str, out: str) -> None:
    """The mergeme side of one measurement (run in its own process)."""
    from mergeme.checkpoint import Checkpoint
    from mergeme.config import MergeConfig
    from mergeme.merge.moe_builder import build_moe

    spec = json.loads(spec_json)
    base = Checkpoint(spec["base"])
    experts = [Checkpoint(path, name=f"e{i}") for i, path in enumerate(spec["experts"])]
    settings = MergeConfig(trunk_method=spec["method"], output_dtype="bfloat16")
    build_moe(base, experts, Path(out), settings)


def prepare(workdir: Path, name: str) -> tuple[Path, list[Path]]:
    """The base and expert checkpoints of one size (written once, reused after)."""
    folder = workdir / name
    base, experts = folder / "base", [folder / f"expert{i}" for i in range(NUM_EXPERTS)]
    for seed, checkpoint in enumerate([base, *experts]):
        if not (checkpoint / "config.json").is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)
            print(f"writing {checkpoint} ...", flush=True)
            write_synthetic_llama(checkpoint, SIZES[name], seed)
    return base, experts


def bench_size(
    workdir: Path, name: str, runs: int, mergekit: Path | None
) -> dict[str, list[Measurement]]:
    """Every tool's measurements on one size, the tools interleaved within each run."""
    base, experts = prepare(workdir, name)
    scratch = workdir / name / "out"
    results: dict[str, list[Measurement]] = {}
    output_bytes = 0
    for run in range(runs):
        commands = {f"mergeme {m}": mergeme_command(base, experts, scratch, m) for m in METHODS}
        if mergekit is not None:
            commands = {"mergekit-moe": mergekit_command(mergekit, base, experts, scratch)} | (
                commands
            )
        # what every mergeme run pays before merging: the interpreter and its imports
        imports = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {STARTUP_IMPORTS}"
        commands["mergeme start-up only"] = [sys.executable, "-c", imports]
        for tool, command in commands.items():
            shutil.rmtree(scratch, ignore_errors=True)
            result = measure(command, workdir / f"{name}-{tool.replace(' ', '-')}.log")
            output_bytes = output_bytes or (scratch.exists() and folder_bytes(scratch))
            results.setdefault(tool, []).append(result)
            print(f"{name} run {run + 1}: {tool} {result.wall_s:.1f} s", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
        floor = io_floor([base, *experts], output_bytes, workdir / "floor.bin")
        results.setdefault("I/O floor", []).append(floor)
        print(f"{name} run {run + 1}: I/O floor {floor.wall_s:.1f} s", flush=True)
    return results


def table(name: str, inputs_bytes: int, results: dict[str, list[Measurement]]) -> str:
    """A markdown table of medians with ratios to mergekit-moe and to the I/O floor."""
    wall = {tool: statistics.median(m.wall_s for m in ms) for tool, ms in results.items()}
    rss = {tool: statistics.median(m.peak_rss_bytes for m in ms) for tool, ms in results.items()}
    runs = len(next(iter(results.values())))
    lines = [
        f"**{name}**: 5 checkpoints × {inputs_bytes / 5 / 1e9:.2f} GB (base + {NUM_EXPERTS} "
        f"experts), median of {runs} run(s)",
        "",
        "| tool | wall s | peak RSS GB | wall / mergekit | RSS / mergekit | wall / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    reference = "mergekit-moe" if "mergekit-moe" in wall else None
    for tool in results:
        ratio_wall = f"{wall[tool] / wall[reference]:.2f}" if reference else "-"
        ratio_rss = f"{rss[tool] / rss[reference]:.2f}" if reference and rss[tool] else "-"
        peak = f"{rss[tool] / 1e9:.2f}" if rss[tool] else "-"
        lines.append(
            f"| {tool} | {wall[tool]:.1f} | {peak} | {ratio_wall} | {ratio_rss} | "
            f"{wall[tool] / wall['I/O floor']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small", help="comma-separated: small, large")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="kept and reused; default: a temp dir")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--merge-once", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge_once:
        merge_once(*args.merge_once)
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeme-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        mergekit = None if args.skip_mergekit else install_mergekit(workdir)
        reports = []
        for name in sizes:
            results = bench_size(workdir, name, args.runs, mergekit)
            inputs = sum(folder_bytes(workdir / name / c) for c in os.listdir(workdir / name))
            reports.append(table(name, inputs, results))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}\n"
    )
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
