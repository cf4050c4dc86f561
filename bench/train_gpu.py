"""Stage-6 training speed and memory on the full-size Qwen2.5-VL-7B architecture (random bf16 weights).

Builds the 7B model from its config (no download), makes ~400-token synthetic pairs with 448x448 images (256
image tokens each), and trains a few LoRA steps through stage 6's own code path (`build_trainer`: one vision pass
per pair, precomputed reference) under DeepSpeed ZeRO-2. `--baseline` runs plain TRL DPOTrainer on the same
shapes, the same LoRA targets and the same DeepSpeed config, so the two JSONs compare like for like.

    python bench/train_gpu.py --out bench/results/train_h100_1gpu.json
    python bench/train_gpu.py --baseline --out bench/results/train_h100_1gpu_trl.json
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \\
        bench/train_gpu.py --out bench/results/train_h200x2.json
    python bench/train_gpu.py --tiny --out /tmp/train_tiny.json      # CPU, seconds: checks the script itself

The JSON holds the device, library versions, the shapes actually measured, seconds per timed step, pairs/s,
peak GPU memory (max over processes), the per-step losses and the reference pass's time. Random weights give
honest speed and memory, never quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# NVLink multicast can take shared GPUs out of service: keep it off in every process this starts.
for _key, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_key, _value)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen2.5-VL-7B-Instruct's architecture (config.json of the hub checkpoint).
QWEN25VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
QWEN25VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
TINY_TEXT = dict(
    vocab_size=1300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]},
    tie_word_embeddings=False,
)
TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Where the result JSON goes.")
    p.add_argument("--baseline", action="store_true", help="Plain TRL DPOTrainer instead of stage 6's trainer.")
    p.add_argument(
        "--tiny", action="store_true", help="A tiny model on CPU (seconds): checks the script, measures nothing."
    )
    p.add_argument("--steps", type=int, default=6, help="Timed optimizer steps.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps before them.")
    p.add_argument("--batch", type=int, default=8, help="Pairs per GPU per optimizer step.")
    p.add_argument("--micro-batch", type=int, default=0, help="Pairs per forward (0: all of --batch at once).")
    p.add_argument(
        "--tokens", type=int, default=400, help="Tokens per sequence: prompt (image included) + completion."
    )
    p.add_argument("--image-size", type=int, default=448, help="Square image side in pixels (448: 256 image tokens).")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument(
        "--deepspeed", default="auto", help="zero2, zero3, a JSON path, 'none', or 'auto' (zero2; none with --tiny)."
    )
    p.add_argument(
        "--no-share", action="store_true", help="Stage 6 with each image encoded per completion (TRL's way)."
    )
    p.add_argument("--no-precompute", action="store_true", help="Stage 6 with the reference forward in every step.")
    p.add_argument(
        "--no-share-prompt", action="store_true", help="Stage 6 with each pair's prompt run once per completion."
    )
    p.add_argument(
        "--no-fused-kernels", action="store_true", help="Stage 6 with PEFT's LoRA forward and the library's modules."
    )
    p.add_argument(
        "--no-compile-layers", action="store_true", help="Stage 6 with its language-model layers run eagerly."
    )
    p.add_argument(
        "--layers-changing-sizes",
        action="store_true",
        help="Compile the layers with only the sizes that change between steps symbolic (torch's automatic dynamic "
        "shapes) instead of every size.",
    )
    p.add_argument(
        "--no-cache-image-features",
        action="store_true",
        help="Stage 6 running the vision tower in every step (no image features cached before training).",
    )
    p.add_argument(
        "--no-gradient-checkpointing", action="store_true", help="Keep activations (faster, more memory); both modes."
    )
    p.add_argument(
        "--reentrant",
        action="store_true",
        help="Recompute with reentrant checkpointing (no per-tensor hooks) instead of stage 6's non-reentrant kind.",
    )
    p.add_argument(
        "--library-zero-reductions",
        action="store_true",
        help="Keep DeepSpeed's per-gradient inf/NaN check and gradient norm instead of capdpo's multi-tensor ones "
        "(capdpo.training.zero).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        default=None,
        help="Also run one more step under torch.profiler and write its operator table to this file.",
    )
    p.add_argument(
        "--profile-python",
        action="store_true",
        help="With --profile, also record every Python call and head the file with where Python was while the "
        "device sat idle.",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="Run folder shared by all processes (the reference cache lives there); default: a new temp folder, "
        "which only a single process can use. Give a fresh folder per launch: random weights are not fingerprinted.",
    )
    return p.parse_args(argv)


def _single_process_env() -> None:
    """DeepSpeed needs a process group even on one GPU without a launcher."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def build_model(processor: Any, tiny: bool, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in (
            "<|im_end|>",
            "<|endoftext|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
        )
    }
    text = dict(
        TINY_TEXT if tiny else QWEN25VL_7B_TEXT,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
    )
    vision = dict(TINY_VISION if tiny else QWEN25VL_VISION, out_hidden_size=text["hidden_size"])
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # every process builds the same weights
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def synthetic_pairs(
    processor: Any, n: int, tokens: int, image_size: int, folder: Path, seed: int
) -> tuple[list[Any], dict[str, int]]:
    """n pairs whose sequences are ~`tokens` long, over random-noise images of image_size^2 pixels."""
    import numpy as np
    from PIL import Image

    from capdpo.models.tiny import _WORDS
    from capdpo.records import PairRecord
    from capdpo.training.data import PairEncoder

    rng = random.Random(seed)
    images = []
    for i in range(min(n, 16)):
        pixels = np.random.default_rng(seed + i).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        path = folder / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        images.append(str(path))
    prompt = "Describe this image in detail."
    encoder = PairEncoder(processor)
    probe = PairRecord(
        id="probe",
        image_id="x",
        image=images[0],
        prompt=prompt,
        chosen="a",
        rejected="b",
        score_chosen=1.0,
        score_rejected=0.0,
        mode="context",
    )
    prompt_tokens = encoder.prompt_length(probe).prompt
    budget = max(4, tokens - prompt_tokens)

    def completion() -> str:
        words: list[str] = []
        while True:
            words.append(rng.choice(_WORDS))
            text = " ".join(words) + "."
            if len(encoder.completion_ids(encoder.render(probe, text)[1])) >= budget:
                return text

    pairs = [
        PairRecord(
            id=f"pair{i}",
            image_id=f"image{i % len(images)}",
            image=images[i % len(images)],
            prompt=prompt,
            chosen=completion(),
            rejected=completion(),
            score_chosen=0.9,
            score_rejected=0.2,
            mode="context",
        )
        for i in range(n)
    ]
    return pairs, {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": budget,
        "image_tokens": encoder.prompt_length(probe).image_tokens,
    }


PEAK_BF16 = 989e12  # dense bf16 tensor-core peak of an H100 SXM and an H200 (FLOP/s)


def _matmul_rate(cuda: bool) -> float:
    """bf16 matmul rate measured on this card (FLOP/s), from an 8192^3 product."""
    if not cuda:
        return float("nan")
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * n**3 * 20 / (time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return rate


def pair_flops(model: Any, shapes: dict[str, int]) -> float:
    """Matmul FLOPs one pair needs in a LoRA step with a precomputed reference: the text layers forward and
    backward to their inputs (4 per parameter and token) over the prompt once and both completions, the LM head
    on the completion tokens, and the frozen vision tower's forward on the image's patches."""
    backbone = model.model
    layers = sum(p.numel() for p in backbone.language_model.layers.parameters())
    vision = sum(p.numel() for p in backbone.visual.parameters())
    head = model.get_output_embeddings().weight.numel()
    prompt, completion = shapes["prompt_tokens"], shapes["completion_tokens"]
    patches = shapes["image_tokens"] * 4
    return float(4 * layers * (prompt + 2 * completion) + 4 * head * 2 * completion + 2 * vision * patches)


def _timer_callback(
    warmup: int, cuda: bool, profile_step: int = 0, profile_out: Path | None = None, python: bool = False
) -> Any:
    """Times every optimizer step after `warmup`; with `profile_step`, records that step with torch.profiler and
    writes its operator table (sorted by device time) to `profile_out`, and with `python` where the host's Python
    was while the device sat idle (`bench.common.python_idle_table`)."""
    import torch
    import torch._dynamo.utils
    from transformers import TrainerCallback

    from bench.common import operator_table, profiler, python_idle_table

    class StepTimer(TrainerCallback):
        """Step times, and where each step's time goes along the device's timeline (`phase_ms`): from the step's
        start to the first image encoding (`prelude`), inside the vision tower, inside the language model's forward
        calls, from the last of those to the step's end (loss, backward and optimizer step), and the rest."""

        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            # from one step's end to the next one's: the step plus the data loading, collation and logging
            # around it, which the step window leaves out (for TRL and for capdpo alike)
            self.loop_seconds: list[float] = []
            self.losses: list[float] = []
            self.start = 0.0
            self.last_end: float | None = None
            self.profiler: Any = None
            self.marks: list[tuple[str, Any]] = []  # (point, clock) of the step being run
            self.phases: list[dict[str, float]] = []
            # host pauses inside each timed step: Python's cyclic garbage collector (milliseconds, and how many of
            # its collections were full ones) and graphs torch.compile compiled
            self.gc_ms: list[float] = []
            self.full_gcs: list[int] = []
            self.graphs: list[int] = []
            self._gc = {"ms": 0.0, "full": 0, "since": None}
            self.graphs_at_start = 0
            gc.callbacks.append(self._on_gc)

        def _on_gc(self, phase: str, info: dict) -> None:
            if phase == "start":
                self._gc["since"] = time.perf_counter()
            elif self._gc["since"] is not None:
                self._gc["ms"] += (time.perf_counter() - self._gc["since"]) * 1e3
                self._gc["full"] += info.get("generation") == 2
                self._gc["since"] = None

        @staticmethod
        def _graphs() -> int:
            return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

        def _mark(self, point: str) -> None:
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks.append((point, event))
            else:
                self.marks.append((point, time.perf_counter()))

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            for name, module in model.named_modules() if model is not None else []:
                part = name.rsplit(".", 1)[-1]
                if part in ("visual", "language_model") and not getattr(module, "_bench_timed", False):
                    module._bench_timed = True
                    module.register_forward_pre_hook(lambda *_, p=part: self._mark(p + "_start"))
                    module.register_forward_hook(lambda *_, p=part: self._mark(p + "_end"))

        def _phase_ms(self) -> dict[str, float]:
            """Milliseconds of each phase of the step just ended (its marks run from step_start to step_end)."""
            if cuda:
                first = self.marks[0][1]
                at = [(p, first.elapsed_time(e)) for p, e in self.marks]
            else:
                at = [(p, (t - self.marks[0][1]) * 1e3) for p, t in self.marks]
            total = at[-1][1]
            inside = {"visual": 0.0, "language_model": 0.0}
            opened: dict[str, float] = {}
            for point, ms in at:
                part, _, edge = point.rpartition("_")
                if part in inside and edge == "start":
                    opened[part] = ms
                elif part in inside and edge == "end" and part in opened:
                    inside[part] += ms - opened.pop(part)
            starts = [ms for p, ms in at if p.endswith("_start") and p != "step_start"]
            ends = [ms for p, ms in at if p == "language_model_end"]
            phases = {
                "prelude": min(starts) if starts else 0.0,
                "vision": inside["visual"],
                "text_forward": inside["language_model"],
                "after_last_forward": total - max(ends) if ends else 0.0,
            }
            phases["other"] = total - sum(phases.values())
            return {k: round(v, 2) for k, v in phases.items()} | {"step": round(total, 2)}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if profile_step and state.global_step + 1 == profile_step:
                self.profiler = profiler(cuda, python=python)
                self.profiler.__enter__()
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()
            self._gc.update(ms=0.0, full=0)
            self.graphs_at_start = self._graphs()
            self.marks = []
            self._mark("step_start")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark("step_end")
            if cuda:
                torch.cuda.synchronize()
            end, last_end = time.perf_counter(), self.last_end
            self.last_end = end
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                if profile_out is not None:
                    text = operator_table(self.profiler, cuda)
                    if python:
                        with tempfile.TemporaryDirectory() as tmp:
                            trace = Path(tmp) / "trace.json"
                            self.profiler.export_chrome_trace(str(trace))
                            text = python_idle_table(json.loads(trace.read_text())) + "\n" + text
                    profile_out.write_text(text)
                self.profiler = None
                self.last_end = None  # nor is the loop around it
                return  # a profiled step is not timed
            if state.global_step > warmup:
                self.step_seconds.append(end - self.start)
                self.phases.append(self._phase_ms())
                self.gc_ms.append(round(self._gc["ms"], 2))
                self.full_gcs.append(self._gc["full"])
                self.graphs.append(self._graphs() - self.graphs_at_start)
                if last_end is not None:
                    self.loop_seconds.append(end - last_end)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs and "train_runtime" not in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.steps, args.warmup, args.batch = min(args.steps, 2), min(args.warmup, 1), min(args.batch, 2)
        args.tokens, args.image_size, args.lora_r = min(args.tokens, 60), 56, 8
    if args.deepspeed == "auto":
        args.deepspeed = "none" if args.tiny else "zero2"
    deepspeed = None
    if args.deepspeed != "none":
        from capdpo.training.setup import DEEPSPEED_DIR

        deepspeed = (
            str(DEEPSPEED_DIR / f"{args.deepspeed}.json") if not args.deepspeed.endswith(".json") else args.deepspeed
        )
        _single_process_env()
    micro = args.micro_batch or args.batch
    if args.batch % micro:
        raise SystemExit("--batch must be a multiple of --micro-batch")

    from capdpo.config import CommonConfig
    from capdpo.models.loading import LoadedModel, family_of
    from capdpo.provenance import git_commit, library_versions
    from capdpo.training.config import DpoConfig as TrainConfig
    from capdpo.training.dpo import build_trainer
    from capdpo.training.dpo import dpo_arguments as dpo_args

    if args.layers_changing_sizes:
        from capdpo.models import patches

        patches.LAYER_SIZES_SYMBOLIC = None
    dtype = torch.bfloat16 if cuda else torch.float32
    settings = TrainConfig(
        method="lora",
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        batch_size=micro,
        gradient_accumulation_steps=args.batch // micro,
        max_steps=args.warmup + args.steps + bool(args.profile),
        max_length=0,
        learning_rate=1e-5,
        warmup_ratio=0.0,
        save_steps=10**9,
        precompute_ref=not args.no_precompute,
        share_image_features=not args.no_share,
        share_prompt=not args.no_share_prompt,
        fused_kernels=not args.no_fused_kernels,
        compile_layers=not args.no_compile_layers,
        cache_image_features=not args.no_cache_image_features,
        ref_batch_size=micro,
        gradient_checkpointing=not args.no_gradient_checkpointing,
    )
    if args.work_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("bench/train_gpu.py: several processes need one shared --work-dir (a fresh folder)")
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    common = CommonConfig(run_dir=args.work_dir or tempfile.mkdtemp(prefix="capdpo-bench-"), seed=args.seed)
    work = Path(common.run_dir)
    dpo = dpo_args(
        settings, common, work / "checkpoints", deepspeed=deepspeed, bf16=cuda, use_cpu=not cuda, has_eval=False
    )
    from transformers.trainer_utils import SaveStrategy

    dpo.save_strategy = SaveStrategy.NO  # timing only: no checkpoint writes
    if args.reentrant and not args.no_gradient_checkpointing:
        dpo.activation_checkpointing_kwargs = dpo.gradient_checkpointing_kwargs = {"use_reentrant": True}
    device = dpo.device
    world = dpo.world_size
    is_main = dpo.process_index == 0

    from bench.common import build_processor

    processor = build_processor(args.image_size)
    pairs, shapes = synthetic_pairs(
        processor,
        (args.warmup + args.steps + bool(args.profile)) * args.batch * world,
        args.tokens,
        args.image_size,
        work,
        args.seed,
    )
    rates = _matmul_rate(cuda)
    built = time.perf_counter()
    model = build_model(processor, args.tiny, device, dtype)
    flops_per_pair = pair_flops(model, shapes)
    build_seconds = time.perf_counter() - built
    name = "tiny Qwen2.5-VL (random)" if args.tiny else "Qwen2.5-VL-7B architecture (random bf16 weights)"
    lm = LoadedModel(
        model=model, processor=processor, name=name, device=device, dtype=dtype, family=family_of(model.config)
    )
    profile_step = args.warmup + args.steps + 1 if args.profile else 0
    timer = _timer_callback(
        args.warmup, cuda, profile_step, Path(args.profile) if args.profile else None, args.profile_python
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    if args.baseline:
        trainer = _trl_baseline(settings, lm, pairs, dpo, timer)
        reference_seconds, share, precomputed, packed, tuned = 0.0, False, False, False, {}
        features, feature_seconds = False, 0.0
    else:
        trainer = build_trainer(
            settings,
            lm,
            pairs,
            [],
            dpo,
            reference_root=work / "ref_logps",
            fingerprint={"bench": args.seed},
            callbacks=[timer],
        )
        if args.library_zero_reductions:
            from capdpo.training.zero import library_zero_reductions

            library_zero_reductions()
        reference_seconds, share, precomputed, packed, tuned = (
            trainer.reference_seconds,
            trainer.share_images,
            trainer.reference is not None,
            trainer.share_prompt,
            trainer.tuned,
        )
        features, feature_seconds = trainer.features is not None, trainer.feature_seconds
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if world > 1:
        import torch.distributed as dist

        peak_t = torch.tensor([peak], device=device)
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        peak = float(peak_t.item())

    if timer._on_gc in gc.callbacks:
        gc.callbacks.remove(timer._on_gc)
    seconds = timer.step_seconds
    mean = sum(seconds) / len(seconds) if seconds else float("nan")
    loops = timer.loop_seconds
    pairs_per_step = args.batch * world
    result = {
        "mode": "trl-baseline" if args.baseline else "capdpo",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": world,
        "model": name,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "deepspeed": deepspeed,
        "lora": {
            "r": args.lora_r,
            "targets": "language-model q/k/v/o/gate/up/down",
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        },
        "shapes": {
            **shapes,
            "image_size": args.image_size,
            "pairs_per_step": pairs_per_step,
            "pairs_per_forward_per_gpu": micro,
        },
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "checkpointing": "reentrant" if args.reentrant else "non-reentrant",
        "compiled_layer_sizes": "changing symbolic" if args.layers_changing_sizes else "all symbolic",
        "zero_reductions": "deepspeed" if args.baseline or args.library_zero_reductions else "capdpo multi-tensor",
        "share_image_features": share,
        "share_prompt": packed,
        "fused_kernels": tuned,  # modules changed by capdpo.models.patches.tune_for_training, by kind
        "precomputed_reference": precomputed,
        "cached_image_features": features,
        "feature_pass_seconds": round(feature_seconds, 3),
        "reference_pass_seconds": round(reference_seconds, 3),
        "reference_pass_pairs": len(pairs) if precomputed else 0,
        "model_build_seconds": round(build_seconds, 2),
        "warmup_steps": args.warmup,
        "timed_steps": len(seconds),
        "step_seconds": [round(s, 4) for s in seconds],
        "pairs_per_second": round(pairs_per_step / mean, 4) if seconds else None,
        # the whole training loop between two step ends: data loading, collation and logging included
        "loop_seconds": [round(s, 4) for s in loops],
        "loop_pairs_per_second": round(pairs_per_step * len(loops) / sum(loops), 4) if loops else None,
        "peak_memory_gib": round(peak, 2),
        # model FLOPs of a step's useful work (prompt once, both completions, frozen base: forward + input
        # gradients, recomputation not counted) over the card's dense bf16 peak and over the matmul rate measured here
        "flops_per_pair": flops_per_pair,
        "peak_flops": PEAK_BF16,
        "measured_matmul_flops": rates,
        "mfu": round(flops_per_pair * pairs_per_step / mean / world / PEAK_BF16, 4) if seconds and cuda else None,
        "share_of_floor": round(flops_per_pair * pairs_per_step / mean / world / rates, 4)
        if seconds and cuda
        else None,
        # mean milliseconds per timed step along the device's timeline (see StepTimer)
        "phase_ms": {k: round(sum(p[k] for p in timer.phases) / len(timer.phases), 2) for k in timer.phases[0]}
        if timer.phases
        else None,
        "losses": timer.losses,
        # per timed step: host milliseconds in Python's garbage collector, its full collections, graphs compiled
        "gc_ms_per_step": timer.gc_ms,
        "full_gc_per_step": timer.full_gcs,
        "graphs_compiled_per_step": timer.graphs,
        "train_wall_seconds": round(wall, 2),
        "command": [sys.executable, *sys.argv] if argv is None else ["bench/train_gpu.py", *argv],
    }
    if is_main:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in (
                        "mode",
                        "device",
                        "gpus",
                        "pairs_per_second",
                        "loop_pairs_per_second",
                        "peak_memory_gib",
                        "mfu",
                        "share_of_floor",
                        "step_seconds",
                    )
                }
            )
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _trl_baseline(settings: Any, lm: Any, pairs: list[Any], dpo: Any, timer: Any) -> Any:
    """Plain TRL DPOTrainer on the same pairs: its own vision collator, reference forward in every step."""
    from datasets import Dataset
    from trl import DPOTrainer

    from capdpo.images import load_image
    from capdpo.training.setup import peft_setup

    rows = [
        {
            "images": [load_image(p.image)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.prompt}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p.chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": p.rejected}]}],
        }
        for p in pairs
    ]
    dpo.remove_unused_columns = True
    return DPOTrainer(
        model=lm.model,
        args=dpo,
        train_dataset=Dataset.from_list(rows),
        processing_class=lm.processor,
        peft_config=peft_setup(settings, lm.model),
        callbacks=[timer],
    )


if __name__ == "__main__":
    run()
