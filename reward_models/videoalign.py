"""VideoAlign's formats (Liu et al. 2025, arXiv 2501.13918; KwaiVGI/VideoAlign, commit 219ab9d), read by
`visalign.reward_models.video.VideoReward`: the official prompt text, quoted verbatim, and the checkpoint layouts.

- Prompts: `build_prompt` (prompt_template.py) with the checkpoint's `data_config.prompt_template_type`; the released
  checkpoint's `"detailed_special"` is `DETAILED_PROMPT_WITH_SPECIAL_TOKEN`, in `VIDEOALIGN_PROMPTS` with the
  official placeholder `{text_prompt}`; `"visalign"` is our earlier shorter wording (`VISALIGN_PROMPT*`).
- Checkpoints (`load_model_from_checkpoint`, utils.py): `checkpoint-<step>/model.pth`, the full state dict of the
  PEFT-wrapped model (`base_model.model.*`, LoRA layers as `*.base_layer.*` + `*.lora_A/B.default.*`) or a merged
  one; or `adapter_model.safetensors` + `non_lora_state_dict.pth`. `split_peft_state` unwraps them, `merge_lora`
  merges LoRA into the base weights (`W = W0 + s B A`, embeddings `W0 + s (B A)^T`, `s = lora_alpha / r`, or
  `/ sqrt(r)` with rsLoRA, from `lora_settings`), and `videoalign_key` maps the keys (transformers 4 names) onto
  `VideoReward`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from visalign.reward_models.loading import read_json

SHORT_NAMES = ("VQ", "MQ", "TA")  # VideoAlign's names, used in its config
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
PLACEHOLDER = "{text_prompt}"

# VideoAlign's prompt_template.py, DETAILED_PROMPT_WITH_SPECIAL_TOKEN and DETAILED_PROMPT, verbatim (trailing spaces
# included), assembled from their shared sections.
_VA_INTRO = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 "
    "being the worst and 10 being the best. Each evaluation should be independent of the others.\n"
    "\n"
)
_VA_VISUAL = (
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
)
_VA_MOTION = (
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing "
    "body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing "
    "should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth "
    "movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions "
    "or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally "
    "with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where "
    "the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
    "quality.\n"
    "\n"
)
_VA_TEXT = (
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like "
    "talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, "
    "scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking "
    "if real-world locations or scenes are accurately represented, though some stylistic adaptation is "
    "acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) "
    "are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
)
VIDEOALIGN_PROMPTS = {
    "detailed_special": _VA_INTRO
    + _VA_VISUAL
    + "Please provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n"
    + _VA_MOTION
    + "Please provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n"
    + _VA_TEXT
    + "Please provide the ratings of Text Alignment: <|TA_reward|>\nEND\n",
    "detailed": _VA_INTRO
    + _VA_VISUAL
    + _VA_MOTION
    + _VA_TEXT
    + "Please provide the ratings of Visual Quality, Motion Quality, and Text Alignment.\n",
    "none": PLACEHOLDER,
}
# Our earlier wording (the same structure, shorter), kept as `prompt_template="visalign"`.
_CRITERIA = (
    "You are rating a generated video on three separate criteria, each from 0 (worst) to 10 (best), each on its own."
    "\n\nVisual Quality: the static quality of the frames: plausible bodies and scenes, sharpness, rich detail in "
    "textures and lighting, pleasing color and composition, and no harmful content.\n{VQ}"
    "\n\nMotion Quality: the dynamics: stable frames without sudden jumps or flicker, physically natural and smooth "
    "movement, moving parts that blend with the background, and enough movement (a nearly static video rates low).\n"
    "{MQ}\n\nText Alignment: how well the video matches the text prompt in its subjects, their actions, the scene, "
    "the style and the camera movement.\nText prompt: {text_prompt}\n{TA}"
)
VISALIGN_PROMPT_TOKENS = _CRITERIA.format(
    **{
        s: f"Rating of {n}: {t}\nEND"
        for s, n, t in zip(SHORT_NAMES, ("Visual Quality", "Motion Quality", "Text Alignment"), REWARD_TOKENS)
    },
    text_prompt=PLACEHOLDER,
)
VISALIGN_PROMPT = _CRITERIA.format(
    VQ="", MQ="", TA="Rate the Visual Quality, Motion Quality and Text Alignment.", text_prompt=PLACEHOLDER
)


def resolve_video_prompt(template: str, reward_tokens: bool) -> str:
    """A template name (`"official"`, `"visalign"`, or a VideoAlign `prompt_template_type`) or a template string with
    `{text_prompt}` -> the template string."""
    if not isinstance(template, str):
        raise ValueError(f"`prompt_template` must be a name or a string with {PLACEHOLDER}, got {template!r}")
    if template == "official":
        template = "detailed_special" if reward_tokens else "detailed"
    if template == "visalign":
        return VISALIGN_PROMPT_TOKENS if reward_tokens else VISALIGN_PROMPT
    template = VIDEOALIGN_PROMPTS.get(template, template)
    if PLACEHOLDER not in template:
        raise ValueError(
            f"`prompt_template` must be one of 'official', 'visalign', {sorted(VIDEOALIGN_PROMPTS)} or a string "
            f"containing the placeholder {PLACEHOLDER} (VideoAlign's), got {template[:80]!r}"
        )
    return template


def videoalign_key(key: str) -> str | None:
    """A VideoAlign checkpoint key (transformers 4 names, PEFT wrapping and adapter names removed by
    `split_peft_state`) -> `VideoReward`'s key; None for PEFT's frozen copy of a module saved in full."""
    key = key.replace(".modules_to_save.default.", ".")
    if ".original_module." in key:
        return None
    if key == "rm_head.weight":
        return "head.weight"
    if key.startswith(("model.visual.", "model.language_model.")):
        return "model." + key
    if key.startswith("visual."):
        return "model.model." + key
    if key.startswith("model."):
        return "model.model.language_model." + key.removeprefix("model.")
    return "model." + key if key.startswith("lm_head.") else key


def split_peft_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A (possibly PEFT-wrapped) state dict -> (plain weights, LoRA tensors), keys without `base_model.model.`.

    `X.base_layer.weight` becomes `X.weight`; `X.lora_A.default.weight` (a model's state dict) and `X.lora_A.weight`
    (`save_pretrained`'s adapter file) both become `X.lora_A.weight`, embeddings' `X.lora_embedding_A`.
    """
    plain, lora = {}, {}
    for key, value in state.items():
        key = re.sub(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)", r".\1", key.removeprefix("base_model.model."))
        if ".lora_" in key:
            lora[key] = value
        else:
            plain[key.replace(".base_layer.", ".")] = value
    return plain, lora


def merge_lora(
    plain: dict[str, Tensor], lora: dict[str, Tensor], r: int, scaling: float, base: Callable[[str], Tensor | None]
) -> tuple[list[str], list[str]]:
    """Merge LoRA pairs into `plain` in place: `W = W0 + scaling * B A` for linear layers (`lora_A` `[r, in]`,
    `lora_B` `[out, r]`), `W0 + scaling * (B A)^T` for embeddings (`lora_embedding_A` `[r, vocab]`, `..._B`
    `[dim, r]`), as PEFT's `get_delta_weight`. `W0` is `plain`'s or else `base(key)`.

    Returns the LoRA keys that fit nothing (unexpected) and the shape mismatches.
    """
    unexpected, mismatched = [], []
    pairs = {".lora_A.weight": (".lora_B.weight", False), ".lora_embedding_A": (".lora_embedding_B", True)}
    used = set()
    for key_a in lora:
        suffix = next((s for s in pairs if key_a.endswith(s)), None)
        if suffix is None:
            continue
        module, (suffix_b, transpose) = key_a.removesuffix(suffix), pairs[suffix]
        key_b, target = module + suffix_b, module + ".weight"
        w0 = plain[target] if target in plain else base(target)
        if key_b not in lora or w0 is None:
            continue
        used |= {key_a, key_b}
        a, b = lora[key_a].float(), lora[key_b].float()
        delta = scaling * (b @ a)
        delta = delta.T if transpose else delta
        if a.shape[0] != r or b.shape[1] != r or delta.shape != w0.shape:
            mismatched.append(f"{key_a} {tuple(a.shape)} / {key_b} {tuple(b.shape)} (r={r}) vs {tuple(w0.shape)}")
            continue
        plain[target] = (w0.float() + delta).to(w0.dtype)
    unexpected += [k for k in lora if k not in used]
    return unexpected, mismatched


def lora_settings(lora: dict[str, Any], checkpoint: Path, *, what: str) -> tuple[int, float]:
    """`(r, scaling)` from `model_config.json`'s `peft_lora_config` (what the official inference builds its
    `LoraConfig` from) or, when LoRA is not enabled there, the checkpoint's `adapter_config.json`."""
    if lora.get("lora_enable"):
        r, alpha, rslora = lora.get("lora_r", 16), lora.get("lora_alpha", 32), lora.get("use_rslora", False)
    elif (checkpoint / "adapter_config.json").is_file():
        settings = read_json(checkpoint / "adapter_config.json", what=what)
        r, alpha, rslora = settings.get("r"), settings.get("lora_alpha"), settings.get("use_rslora", False)
    else:
        raise ValueError(
            f"{what}: {checkpoint} holds LoRA weights but model_config.json's peft_lora_config does not enable LoRA "
            "and there is no adapter_config.json: the LoRA rank and alpha are unknown"
        )
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{what}: LoRA rank {r!r} and alpha {alpha!r} must be a positive int and a number")
    return r, alpha / (math.sqrt(r) if rslora else r)


def checkpoint_dir(folder: Path, step: int | None, what: str) -> Path:
    """`folder/checkpoint-<step>`, the highest step when `step` is None."""
    steps = sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    if not steps:
        raise FileNotFoundError(f"{what}: {folder} has no checkpoint-<step> folder")
    if step is not None and step not in steps:
        raise ValueError(f"`checkpoint_step` {step} is not in {folder} (steps: {steps})")
    return folder / f"checkpoint-{steps[-1] if step is None else step}"
