"""The choices are objects parsed once (``choices.py``): no module compares their words, and the
words still read and write as before (recipes, cache files, error messages)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import regionspot_cache
from regionspot_cache import choices
from regionspot_cache.choices import Choice
from regionspot_cache.config import (
    ConfigError,
    EvalConfig,
    ExtractConfig,
    OpenSetRule,
    Preprocessing,
    Recipe,
    TextRecipe,
    ViewMode,
    apply_overrides,
)

PACKAGE = Path(regionspot_cache.__file__).parent
CHOICE_KINDS = [
    kind for kind in vars(choices).values() if isinstance(kind, type) and issubclass(kind, Choice) and kind is not Choice
]
# Device names are open-ended strings (cuda:N), not a choice: "auto" and "cpu" are also Decode's
# words, so they are left to the device code (runtime.resolve_device) to compare.
DEVICE_WORDS = {"auto", "cpu"}
WORDS = {word for kind in CHOICE_KINDS for word in kind.words()} - DEVICE_WORDS
DEFINING_MODULE = Path(choices.__file__)
COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def _words_in(node: ast.AST) -> set[str]:
    """The choice words a compared operand spells out: a string, or a tuple/list/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & WORDS
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_words_in(item) for item in node.elts)) if node.elts else set()
    return set()


def _constants_naming_words(trees: dict[Path, ast.Module]) -> set[str]:
    """Module-level names bound to choice words (``RELEASED = "released"``, ``BASELINES = (...)``)
    or to tuples of such names (``METHODS = (REGIONSPOT, *BASELINES)``), anywhere in the package:
    comparing against them compares the words too."""
    assignments = [node for tree in trees.values() for node in tree.body if isinstance(node, ast.Assign)]
    names: set[str] = set()
    for node in assignments:
        for target in node.targets:
            if isinstance(target, ast.Name) and _words_in(node.value):
                names.add(target.id)
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):  # A, B = "released", "consistent"
                names |= {t.id for t, v in zip(target.elts, node.value.elts) if isinstance(t, ast.Name) and _words_in(v)}
    while True:  # tuples of such names, to a fixed point (one may be built of another, in any module order)
        before = len(names)
        for node in assignments:
            parts = node.value.elts if isinstance(node.value, ast.Tuple) else []
            parts = [part.value if isinstance(part, ast.Starred) else part for part in parts]
            if parts and all(isinstance(part, ast.Name) and part.id in names for part in parts):
                names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        if len(names) == before:
            return names


def _operand_names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_operand_names(item) for item in node.elts)) if node.elts else set()
    return set()


def choice_word_comparisons(root: Path) -> list[str]:
    """``file:line: words`` of every ==, !=, in, not in against a choice's words (or a constant
    naming them) outside the module that defines the choices."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in sorted(root.rglob("*.py"))}
    constants = _constants_naming_words(trees)
    found = []
    for path, tree in trees.items():
        if path.name == DEFINING_MODULE.name and path.parent == root:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            for op, (left, right) in zip(node.ops, zip(operands, operands[1:])):
                if not isinstance(op, COMPARISONS):
                    continue
                hits = _words_in(left) | _words_in(right) | ((_operand_names(left) | _operand_names(right)) & constants)
                if hits:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {', '.join(sorted(hits))}")
    return found


def test_no_module_compares_choice_words():
    found = choice_word_comparisons(PACKAGE)
    assert not found, "choices compared as strings (ask the choice object instead):\n" + "\n".join(found)


def test_the_scan_finds_string_comparisons(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text(
        'RELEASED = "released"\nBASELINES = ("clip-box", "clip-mask")\n'
        "def f(mode, method, rule):\n"
        '    return mode == RELEASED or method in BASELINES or rule != "off" or method not in ("x", "int8")\n'
    )
    (package / "b.py").write_text(
        'from pkg.a import RELEASED\ndef g(mode):\n    return RELEASED == mode or mode == "unrelated"\n'
    )
    (package / "choices.py").write_text('def h(word):\n    return word == "released"\n')  # its own module may
    assert choice_word_comparisons(package) == [
        "pkg/a.py:4: RELEASED",
        "pkg/a.py:4: BASELINES",
        "pkg/a.py:4: off",
        "pkg/a.py:4: int8",
        "pkg/b.py:3: RELEASED",
    ]


def test_choices_are_their_words():
    config = ExtractConfig(preprocess="released", text_recipe="released", views_mode="consistent", feature_dtype="int8")
    assert config.preprocess is Preprocessing.RELEASED and config.text_recipe is TextRecipe.RELEASED
    assert config.views_mode is ViewMode.CONSISTENT and config.feature_dtype.scaled
    assert config.preprocess == "released" and f"{config.views_mode}" == "consistent" and repr(config.feature_dtype) == "'int8'"
    assert json.dumps({"dtype": config.feature_dtype, "mode": config.views_mode}) == '{"dtype": "int8", "mode": "consistent"}'
    assert TextRecipe.RELEASED.value.encode() == b"released"
    recipe = apply_overrides(Recipe(), ["eval.open_set.rule=max-sigmoid", "eval.scoring=sigmoid"])
    assert recipe.eval.open_set.rule is OpenSetRule.MAX_SIGMOID and recipe.eval.open_set.rule.rejects
    assert not EvalConfig().open_set.rule.rejects


def test_bad_words_are_named_as_before():
    with pytest.raises(ConfigError, match="extract.views_mode: 'both' is not one of released, consistent"):
        ExtractConfig(views_mode="both")
    with pytest.raises(ConfigError, match="extract.preprocess: 3 is not a str"):
        ExtractConfig(preprocess=3)
    with pytest.raises(ValueError, match="preprocess 'paper' is not one of released, direct"):
        Preprocessing.parse("paper", "preprocess")


def test_recorded_steps_read_back():
    for choice in Preprocessing:
        assert Preprocessing.of_sam_steps(choice.sam_steps) is choice
    assert (
        Preprocessing.of_sam_steps("square resize+mean_std, no_mem_embed (SAM2ImagePredictor.set_image)") is Preprocessing.DIRECT
    )
