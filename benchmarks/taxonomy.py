"""The UniGenBench taxonomy: 5 themes with 20 subthemes, and 10 primary criteria with 27 sub-criteria.

Criterion names are UniGenBench's English CSV names, `"<Primary> - <Sub>"` or a single word for single-level
criteria ("Style"). The one-line definitions are our own wording of what each criterion checks (they feed the VLM
judge's checklist). `canonical_criterion`, `canonical_theme`, `canonical_subtheme` and `canonical_sentence` map the
labels found in the published files (Chinese names, noisy English variants such as "Art-Graphic Art",
"Mapping-Content Mapping" or "Logo/icon design", the Chinese files' mixed "logo/icon设计" (13 rows of theme 设计 in
both `test_prompts_zh.csv` and `test_prompts_zh_long.csv`), "descriptive sentence pattern") onto the canonical names,
and return None for a label they do not know so that the loader can report it. Every theme and subtheme label of the
four published test files (checked at UniGenBench commit 49d0bce) maps to a canonical name.
"""

from __future__ import annotations

import re

from visalign.prompts import primary_of  # noqa: F401  (the prompt sets' rule, re-exported)

# criterion -> (Chinese name in the ZH files, our definition)
CRITERIA: dict[str, tuple[str, str]] = {
    "Style": ("风格", "the requested artistic, photographic or design style, or the named artist's manner"),
    "World Knowledge": (
        "世界知识",
        "real-world entities and facts: landmarks, historical or famous figures, cultural objects, domain knowledge",
    ),
    "Attribute - Color": ("属性-颜色", "the colors given to each entity"),
    "Attribute - Expression": ("属性-表情", "facial expressions that show a clear emotion, not just facial movement"),
    "Attribute - Material": ("属性-材质", "materials and surface textures such as glass, wood, metal or fabric"),
    "Attribute - Quantity": ("属性-数量", "the exact number of entities, especially three or more"),
    "Attribute - Shape": ("属性-形状", "the shapes of entities or of their parts"),
    "Attribute - Size": ("属性-大小", "size, height, length, thickness or width, absolute or relative to others"),
    "Action - Animal": ("动作-动物动作", "what the animals are doing"),
    "Action - Contact Interaction": ("动作-实体间有接触互动", "entities physically touching or acting on each other"),
    "Action - Full-body (Character/Anthropomorphic)": (
        "动作-人物/拟人全身动作",
        "whole-body actions and poses of people or anthropomorphic characters",
    ),
    "Action - Hand (Character/Anthropomorphic)": (
        "动作-人物/拟人手部动作",
        "the hand action, with hands and fingers complete and undistorted",
    ),
    "Action - Non-contact Interaction": (
        "动作-实体间无接触互动",
        "interactions without touch, such as looking at, pointing at or calling to each other",
    ),
    "Action - State": ("动作-状态", "a lasting state of an entity, such as sleeping, floating or melting"),
    "Relationship - Comparison": ("关系-比较关系", "a stated comparison of an attribute between entities"),
    "Relationship - Composition": ("关系-构成关系", "an entity made up of other entities"),
    "Relationship - Inclusion": (
        "关系-包含关系",
        "one entity inside another, including a picture inside a picture",
    ),
    "Relationship - Similarity": ("关系-相似关系", "a stated resemblance between different entities"),
    "Compound - Feature Matching": (
        "复合考点-不同实体特征匹配",
        "several entities, each with its own attributes, without the attributes mixed up",
    ),
    "Compound - Imagination": ("复合考点-想象力", "something impossible in reality, rendered as described"),
    "Grammar - Consistency": ("语法-统一性", "an attribute the prompt says several entities share"),
    "Grammar - Negation": ("语法-否定", "what the prompt says is absent or is not so"),
    "Grammar - Pronoun Reference": ("语法-代词指代", "each pronoun resolved to the entity it refers to"),
    "Entity Layout - Two-Dimensional Space": (
        "实体布局-二维空间",
        "placement in the picture plane: left, right, above, below, centered",
    ),
    "Entity Layout - Three-Dimensional Space": (
        "实体布局-三维空间",
        "placement in depth: in front of, behind, in the distance, inside",
    ),
    "Logical Reasoning": ("逻辑推理", "what follows from the prompt by reasoning about cause, time or physics"),
    "Text Generation": ("文本生成", "the exact requested text, with no missing, extra or misspelled words"),
}

PRIMARY_CRITERIA: tuple[str, ...] = (
    "Style",
    "World Knowledge",
    "Attribute",
    "Action",
    "Relationship",
    "Compound",
    "Grammar",
    "Entity Layout",
    "Logical Reasoning",
    "Text Generation",
)

# theme -> (Chinese name, other spellings); subthemes per theme: name -> (Chinese name, other spellings)
THEMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Creative Divergence": ("创意发散", ("Creativity Divergence", "Creative")),
    "Art": ("艺术", ()),
    "Illustration": ("配图", ("Mapping",)),
    "Film & Story": ("影视故事", ("Film & Storytelling", "Film and Story", "Film")),
    "Design": ("设计", ()),
}
SUBTHEMES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "Creative Divergence": {
        "Imaginative Thinking": ("想象力发散", ("Imagination Divergence", "Imaginative Divergence", "Imagination")),
        "Other": ("其他", ("Others",)),
    },
    "Art": {
        "Graphic Art": ("平面艺术", ("Graphic",)),
        "Photography Art": ("摄影艺术", ("Photographic Art", "Photography")),
        "Three-Dimensional Art": ("立体艺术", ("Sculptural Art", "3D Art", "Sculpture")),
        "Other": ("其他", ("Others",)),
    },
    "Illustration": {
        "Copywriting Illustration": ("文案配图", ("Copywriting Mapping", "Copywriting")),
        "Content Illustration": ("内容配图", ("Content Mapping", "Content")),
    },
    "Film & Story": {
        "Sci-Fi": ("科幻", ("Science Fiction", "Scifi")),
        "Realism": ("写实", ("Realistic",)),
        "Animation": ("动画", ("Anime", "Cartoon")),
    },
    "Design": {
        "Advertising/E-commerce Design": ("广告/电商设计", ("Advertising Design", "E-commerce Design")),
        "Spatial Design": ("空间设计", ("Space Design", "Interior Design")),
        "Game Design": ("游戏设计", ()),
        "UI Design": ("软件界面设计", ("Software Interface Design", "Interface Design", "UI")),
        "Poster Design": ("海报设计", ()),
        "IP Design": ("ip设计", ("IP Character Design",)),
        "Logo/Icon Design": (
            "logo/图标设计",
            ("Logo Design", "Icon Design", "标志设计", "图标设计", "logo/icon设计", "logo设计", "icon设计"),
        ),
        "Design Assets": ("设计素材", ("Design Materials", "Design Material", "Design Elements")),
        "Fashion Design": ("服装设计", ("Clothing Design", "Apparel Design")),
    },
}
SENTENCES: dict[str, tuple[str, ...]] = {
    "Descriptive": ("描述式", "描述式句式", "descriptive sentence pattern", "descriptive sentence", "declarative"),
    "Imperative": ("指令式", "指令式句式", "imperative sentence pattern", "imperative sentence", "instruction"),
}


def _key(label: str) -> str:
    """Lowercase letters, digits and CJK characters only: `"Logo/icon design"` -> `"logoicondesign"`."""
    return re.sub(r"[^0-9a-z\u4e00-\u9fff]+", "", label.lower())


def _table(entries: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    return {_key(alias): name for name, (zh, aliases) in entries.items() for alias in (name, zh, *aliases)}


_CRITERIA = {_key(alias): name for name, (zh, _) in CRITERIA.items() for alias in (name, zh)}
_THEMES = _table(THEMES)
_SUBTHEMES = {theme: _table(subs) for theme, subs in SUBTHEMES.items()}
_SENTENCES = _table({name: ("", aliases) for name, aliases in SENTENCES.items()})


def canonical_criterion(label: str) -> str | None:
    """The canonical name of a UniGenBench test point label (English or Chinese, any dash spacing)."""
    return _CRITERIA.get(_key(label))


def canonical_theme(label: str) -> str | None:
    return _THEMES.get(_key(label))


def canonical_subtheme(theme: str, label: str) -> str | None:
    """The canonical subtheme of `label` within canonical `theme`.

    A label may carry its theme as a prefix ("Art-Graphic Art", "Design-Space Design"); when the whole label is
    unknown, the part after its first "-" is tried.
    """
    table = _SUBTHEMES.get(theme, {})
    found = table.get(_key(label))
    if found is None and "-" in label:
        found = table.get(_key(label.split("-", 1)[1]))
    return found


def canonical_sentence(label: str) -> str | None:
    return _SENTENCES.get(_key(label))


def definition(criterion: str) -> str:
    """Our one-line definition of a canonical criterion; empty for criteria outside the taxonomy."""
    return CRITERIA.get(criterion, ("", ""))[1]
