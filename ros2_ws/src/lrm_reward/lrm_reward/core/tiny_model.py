"""A tiny Large Reward Model built offline: Qwen3-VL of the real architecture plus LRM-shaped adapters.

What this is for: tests, the demo and the CPU benchmark need something that loads through exactly the same
code path as ``Qwen/Qwen3-VL-8B-Instruct`` + ``USC-PSI-Lab/LRM-models`` (a saved Qwen3-VL folder with
tokenizer, processor and chat template; three PEFT LoRA folders, progress carrying ``modules_to_save`` for
the vision tower) without downloading anything. The base model is taught the three JSON answer formats for
under a minute (answers follow how far a bright bar fills the frame), so greedy generation emits parseable
answers and the logits readout sees confident, image-dependent distributions. The adapters are random LoRA
weights with non-zero ``lora_B`` (like trained ones) small enough to keep the answer format.

Taught well, not barely: the build's float rounding differs from CPU to CPU (AVX2 / AVX-512 kernels, MKL
code paths), so the taught model differs too; tests that rely on what it learned hold on any of them only
if every seed learns all three rules with room to spare (see ``teach_answer_format``).

What it is not: a reward model. Its answers mean nothing about robots. Also not used at run time by nodes.
Heavy imports (torch, transformers, peft, tokenizers) happen inside functions.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.core import prompts
from lrm_reward.core.types import Modality

TINY_FORMAT_VERSION = 3  # bump when the build changes: a folder with another version is rebuilt
_MARKER = "tiny_lrm.json"
# What else shapes a built model: the libraries that ran the build (a folder built with others is rebuilt).
BUILD_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template: one turn per message, each image part becomes the vision placeholder triple.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# progress is taught on every 0.1 level, answering the nearest of three values: multi-token answers, and no
# level a test asks about lies between two answers
PROGRESS_TRAINING_LEVELS = (0.0, 0.5, 1.0)
CONTRASTIVE_MIN_GAP = 0.2  # closer pairs can swap order under the per-frame tint: contradictory labels
TINY_TASKS = (
    "put the carrot on the plate",
    "open the top drawer",
    "stack the green block on the red block",
    "pick up the cup and place it in the sink",
    "close the laptop lid",
)

# Released adapters: LoRA on the language model's attention and MLP projections (the vision tower has a
# fused qkv, so these names touch only the language model); progress also saves the whole vision tower.
# Variants of the tiny text model, by name: overrides of the text config (the default stays as it was built).
# "head32": head_dim 32, the smallest head size vLLM's CPU attention supports (it refuses the default's 16
# at the first request); the real Qwen3-VL-8B has 128. mrope_section must sum to head_dim / 2.
TINY_VARIANTS: dict[str, dict] = {
    "default": {},
    "head32": {
        "head_dim": 32,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [8, 4, 4],
            "mrope_interleaved": True,
        },
    },
}
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_ORDER = (Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION)


@dataclass(frozen=True)
class TinyLrm:
    """Folders of a built tiny LRM: base model (with tokenizer + processor) and one folder per adapter."""

    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


def build_tiny_lrm(root: Path, seed: int = 0, variant: str = "default") -> TinyLrm:
    """Build (or reuse, when already built with the same version, seed and variant) a tiny LRM under root.

    variant: a name in TINY_VARIANTS (e.g. "head32" for vLLM's CPU attention).
    """
    root = Path(root)
    base = root / "base"
    adapters = {m.value: root / m.value for m in ADAPTER_ORDER}
    marker = root / _MARKER
    expected = _build_record(seed, variant)
    if (
        marker.is_file()
        and _read_json(marker) == expected
        and all(p.is_dir() for p in [base, *adapters.values()])
    ):
        return TinyLrm(base=base, adapters=adapters)

    import torch

    for path in [base, *adapters.values()]:
        if path.exists():
            shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # One thread: ops this small lose more to thread hand-offs than they gain, badly so on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = build_tiny_tokenizer()
        processor = build_tiny_processor(tokenizer)
        model = build_tiny_model(tokenizer, seed, **TINY_VARIANTS[variant])
        teach_answer_format(model, processor, rng)
        model.save_pretrained(base, safe_serialization=True)
        processor.save_pretrained(base)
        for index, modality in enumerate(ADAPTER_ORDER):
            save_random_adapter(base, adapters[modality.value], modality, seed=seed + 101 * (index + 1))
    finally:
        torch.set_num_threads(threads)
    marker.write_text(json.dumps(expected))
    return TinyLrm(base=base, adapters=adapters)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a build depends on (from package metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in BUILD_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def _build_record(seed: int, variant: str) -> dict:
    """What a build is keyed by (its marker file and cache_key); the default variant is not named, so its
    record (and key) stay what they were before variants existed."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; known: {sorted(TINY_VARIANTS)}")
    record = {"version": TINY_FORMAT_VERSION, "seed": seed, "libraries": library_versions()}
    if variant != "default":
        record["variant"] = variant
    return record


def cache_key(seed: int = 0, variant: str = "default") -> str:
    """Folder name for a shared cache of built tiny models (tests, demo): changes with this file's source,
    the build format, the seed, the variant and the versions of the libraries that run the build."""
    import hashlib

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(_build_record(seed, variant), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cached_tiny_lrm(cache_dir: Path, seed: int = 0, variant: str = "default") -> TinyLrm:
    """The tiny LRM from a shared cache folder (tests and the demo share one), built there when missing.

    Keyed by cache_key, so a change of this file or of a library that runs the build makes a fresh one.
    Built in a scratch folder and renamed into place: parallel processes never see half a model.
    """
    import shutil
    import tempfile

    key = cache_key(seed, variant)
    final = Path(cache_dir) / key
    if not final.is_dir():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_dir))
        build_tiny_lrm(scratch, seed=seed, variant=variant)
        try:
            scratch.rename(final)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(scratch, ignore_errors=True)
    return build_tiny_lrm(final, seed=seed, variant=variant)


def build_tiny_tokenizer():
    """A byte-level BPE with Qwen's pre-tokenizer (digits one at a time) and Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    tokenizer = Qwen2TokenizerFast(
        vocab=model_state["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor(tokenizer, min_pixels: int = 32 * 32, max_pixels: int = 128 * 128):
    """Qwen3VLProcessor with the real patch geometry (16 px patches, 2x2 merge).

    The default pixel budget is small (a 640x480 frame becomes 96x128 px = 12 vision tokens) to keep CPU
    tests fast; the released Qwen3-VL uses min 65536 / max 16777216 pixels.
    """
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 2},
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen3_vl_config(tokenizer, **text_overrides):
    """A Qwen3VLConfig of the real architecture at toy size (~0.3 M parameters)."""
    from transformers import Qwen3VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],  # must sum to head_dim / 2
            "mrope_interleaved": True,
        },
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    text_config.update(text_overrides)
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text_config["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def build_tiny_model(tokenizer, seed: int = 0, **text_overrides):
    """A randomly initialised tiny Qwen3VLForConditionalGeneration with generation defaults set."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(tokenizer, **text_overrides))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    return model


def synthetic_frame(level: float, rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """An RGB frame filled from the bottom to level in [0, 1] by a bright bar (the tiny model's notion of
    progress); its mean brightness is 20 + 215 * level.

    A bar, not a uniformly lit frame: the vision tower's LayerNorms divide a uniform patch's brightness out
    (only its sign around mid-grey survives), which left progress and contrastive half learned.
    """
    h, w = size
    rows = np.clip(level * h - np.arange(h)[::-1], 0.0, 1.0)  # 1 inside the bar, a fraction at its edge
    base = 20 + 215 * rows[:, None, None]
    noise = rng.normal(0.0, 6.0, size=(h, w, 3))
    tint = rng.uniform(-10, 10, size=3)
    return np.clip(base + noise + tint, 0, 255).astype(np.uint8)


def synthetic_example(
    modality: Modality, rng: np.random.Generator
) -> tuple[list[dict], list[np.ndarray], str]:
    """(messages, images, answer text) for one made-up query; answers follow frame brightness."""
    task = TINY_TASKS[int(rng.integers(len(TINY_TASKS)))]
    level = int(rng.integers(11)) / 10
    if modality is Modality.PROGRESS:
        answer_level = min(PROGRESS_TRAINING_LEVELS, key=lambda v: abs(v - level))
        current = synthetic_frame(level, rng)
        images = (
            [synthetic_frame(float(rng.uniform(0.0, 0.1)), rng), current] if rng.random() < 0.8 else [current]
        )
        answer = f"{prompts.PROGRESS_ANSWER_PREFIX}{answer_level:.1f} }}"
    elif modality is Modality.CONTRASTIVE:
        other = int(rng.integers(11)) / 10
        while abs(other - level) < CONTRASTIVE_MIN_GAP - 1e-9:
            other = int(rng.integers(11)) / 10
        images = [synthetic_frame(other, rng), synthetic_frame(level, rng)]
        answer = f'{prompts.CONTRASTIVE_ANSWER_PREFIX}{"ImageB" if level > other else "ImageA"}" }}'
    else:
        images = [synthetic_frame(level, rng)]
        answer = f'{prompts.COMPLETION_ANSWER_PREFIX}{"yes" if level >= 0.5 else "no"}" }}'
    messages = prompts.build_messages(modality, task, len(images))
    return messages, images, answer


def teach_answer_format(
    model, processor, rng: np.random.Generator, steps: int = 300, batch: int = 12, lr: float = 4e-3
) -> None:
    """Fine-tune the whole tiny model briefly so it answers each prompt with its JSON format.

    Loss only on the answer tokens (+ <|im_end|>); left padding puts them at the end of every row. Warm-up,
    then a cosine decay: the last steps settle instead of leaving the weights wherever a step at full rate
    threw them. Measured on seeds 0-3 and on a build forced onto AVX2 kernels: every held-out 0.1 level
    answered right by step ~200 in all three rules. (120 steps at a constant rate on uniformly lit frames
    left progress at ~60 % and, for some seeds, contrastive at chance.)
    """
    import math

    import torch

    tokenizer = processor.tokenizer
    end = "<|im_end|>"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 10

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    # progress (three answers over eleven levels) is the hardest to learn: it gets half of every batch
    modalities = [Modality.PROGRESS, Modality.CONTRASTIVE, Modality.PROGRESS, Modality.COMPLETION]
    for _ in range(steps):
        texts, images, answer_lengths = [], [], []
        for i in range(batch):
            messages, frames, answer = synthetic_example(modalities[i % len(modalities)], rng)
            prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            texts.append(prompt + answer + end)
            images.extend(frames)
            answer_lengths.append(len(tokenizer(answer + end, add_special_tokens=False)["input_ids"]))
        inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        labels = torch.full_like(inputs["input_ids"], -100)
        for row, n in enumerate(answer_lengths):
            labels[row, -n:] = inputs["input_ids"][row, -n:]
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def save_random_adapter(
    base: Path,
    out_dir: Path,
    modality: Modality,
    seed: int = 0,
    r: int = 8,
    lora_alpha: int = 16,
    b_std: float = 0.05,
) -> Path:
    """Save a LoRA adapter shaped like the released ones: random A and non-zero random B.

    b_std 0.05: on the confidently taught base, 0.02 moved answers by barely 1e-3 (tests that check an
    adapter changes the answer had no room); at 0.1 greedy decoding loses the answer format.

    progress also carries modules_to_save for the vision tower (slightly perturbed copy), and its saved
    config lists both "visual" and its nested "merger", as the released progress adapter does.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration.from_pretrained(base, use_safetensors=True)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGET_MODULES),
        modules_to_save=["visual"] if modality is Modality.PROGRESS else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
            elif "modules_to_save" in name and param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.01)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    if modality is Modality.PROGRESS:
        _rewrite_adapter_config(out_dir, modules_to_save=["visual", "merger"])
    return out_dir


def make_zero_b_adapter(src: Path, out_dir: Path) -> Path:
    """Copy an adapter with every lora_B weight zeroed (what PEFT leaves when loading goes wrong)."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(src, out_dir)
    weights_file = out_dir / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    zeroed = {k: (v.zero_() if "lora_B" in k else v) for k, v in weights.items()}
    save_file(zeroed, str(weights_file), metadata={"format": "pt"})
    return out_dir


def make_merged_checkpoint(tiny: TinyLrm, adapter: str, out_dir: Path) -> Path:
    """Merge one adapter into the base weights and save a standalone checkpoint (with the processor)."""
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny.base, use_safetensors=True)
    config = _adapter_config_restricted(tiny.adapters[adapter])
    peft_model = PeftModel.from_pretrained(model, tiny.adapters[adapter], config=config)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoProcessor.from_pretrained(tiny.base).save_pretrained(out_dir)
    return out_dir


def _adapter_config_restricted(folder: Path):
    from peft import LoraConfig

    raw = _read_json(Path(folder) / "adapter_config.json")
    if raw.get("modules_to_save"):
        raw["modules_to_save"] = ["visual"]
    return LoraConfig.from_peft_type(**raw) if hasattr(LoraConfig, "from_peft_type") else LoraConfig(**raw)


def _rewrite_adapter_config(folder: Path, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    raw = _read_json(path)
    raw.update(changes)
    path.write_text(json.dumps(raw, indent=2))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _tokenizer_corpus() -> list[str]:
    texts = [
        prompts.PROGRESS_PROMPT,
        prompts.PROGRESS_PROMPT_NO_INITIAL,
        prompts.PROGRESS_PROMPT_GOAL,
        prompts.CONTRASTIVE_PROMPT,
        prompts.COMPLETION_PROMPT,
        *TINY_TASKS,
        "user assistant system",
        '{ "completion_progress": 0.0 }',
        '{ "more_complete_image": "ImageA" } { "more_complete_image": "ImageB" }',
        '{ "task_completed": "yes" } { "task_completed": "no" }',
        "The robot gripper moved closer to the object, so Image B shows more progress than Image A.",
        "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ' \" ( ) [ ] { } - _ / \\ = + * < > | # @ & % $ ~ ` ^",
    ]
    return texts * 3
