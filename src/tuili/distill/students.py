"""Students: smaller models made from the teacher, and how their layers and heads line up with it.

A student is built from the teacher's own weights, by structured pruning (MLP neurons, attention
heads, whole layers; Minitron's "prune, then distil") or from smaller sizes (fewer layers, a
narrower MLP) reached the same way. Because pruning records what it kept, the student knows which
teacher layer each of its layers was and which teacher head each of its heads was: attention and
hidden-state losses then compare like with like.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor

from tuili.errors import TuiliError
from tuili.models.model import Model
from tuili.prune.config import parse_structured
from tuili.prune.structured import prune_structured_, remove_layers_


class DistillError(TuiliError, ValueError):
    """A teacher and student that cannot be distilled as asked: the message says why and what to do."""


def check_pair(teacher: Model, student: Model) -> None:
    """Refuse pairs whose logits do not describe the same tokens."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise DistillError(
            f"the teacher has {tv} vocabulary entries and the student {sv}: logit distillation "
            "needs one vocabulary (build the student from the teacher, or use the same tokenizer)"
        )
    t_vocab, s_vocab = teacher.tokenizer.backend.get_vocab(), student.tokenizer.backend.get_vocab()
    if t_vocab != s_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
        raise DistillError(
            f"the teacher's and the student's tokenizers map tokens to different ids "
            f"(for example {differ}): distillation needs one tokenizer"
        )


def student_from_teacher(
    teacher: Model, prune: str | dict[str, float], calib: Tensor | None = None, importance: str = "activation"
) -> Model:
    """A copy of the teacher, structurally pruned by `prune` ("mlp=0.5,heads=0.34,layers=4" or its dict)."""
    spec = parse_structured(prune) if isinstance(prune, str) else dict(prune)
    student = copy.deepcopy(teacher)
    prune_structured_(student, spec, importance, calib)
    return student


def student_from_sizes(
    teacher: Model,
    num_hidden_layers: int | None = None,
    intermediate_size: int | None = None,
    calib: Tensor | None = None,
) -> Model:
    """A copy of the teacher with fewer layers and a narrower MLP: the most important neurons and the
    layers of highest block influence are kept (with `calib`; without it neurons by weight norm and
    layers evenly spaced)."""
    cfg = teacher.config
    layers = cfg.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
    width = cfg.intermediate_size if intermediate_size is None else intermediate_size
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise DistillError(f"a student of this teacher has 1 to {cfg.num_hidden_layers} layers, got {layers}")
    if not 1 <= width <= cfg.intermediate_size:
        raise DistillError(f"a student of this teacher has an MLP width of 1 to {cfg.intermediate_size}, got {width}")
    student = copy.deepcopy(teacher)
    if width < cfg.intermediate_size:
        spec = {"mlp": (cfg.intermediate_size - width) / cfg.intermediate_size}
        prune_structured_(student, spec, "activation" if calib is not None else "l2", calib)
    if layers < cfg.num_hidden_layers:
        if calib is not None:
            prune_structured_(student, {"layers": cfg.num_hidden_layers - layers}, calib=calib)
        else:
            keep = set(evenly_spaced(layers, cfg.num_hidden_layers))
            remove_layers_(student, [i for i in range(cfg.num_hidden_layers) if i not in keep], spacing="even")
    return student


def parse_sizes(text: str) -> dict[str, int]:
    """'layers=16,mlp=768' → {"num_hidden_layers": 16, "intermediate_size": 768}."""
    names = {"layers": "num_hidden_layers", "mlp": "intermediate_size"}
    sizes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in names or not value.isdigit():
            raise DistillError(f"student sizes are layers=N,mlp=M (whole numbers); got {item!r}")
        sizes[names[key]] = int(value)
    return sizes


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` indices of `total` spread evenly, always ending with the last: ((i + 1) · total / count) − 1."""
    return [(i + 1) * total // count - 1 for i in range(count)]


@dataclass(frozen=True)
class Alignment:
    """For each student layer, the teacher layer it stands for and, when known, the teacher head
    each of its query heads was (None: match heads by count)."""

    layers: tuple[int, ...]
    heads: tuple[tuple[int, ...] | None, ...]
    source: str  # "pruning record" or "evenly spaced"


def alignment(teacher: Model, student: Model) -> Alignment:
    """Line the student's layers and heads up with the teacher's: from the structural pruning the
    student's record holds beyond the teacher's, replayed on the teacher's shapes; else evenly spaced."""
    t_steps = _structural(teacher)
    s_steps = _structural(student)
    replay = _replay(teacher, s_steps[len(t_steps) :]) if s_steps[: len(t_steps)] == t_steps else None
    if (
        replay is not None
        and len(replay) == student.config.num_hidden_layers
        and all(h is None or len(h) == student.config.num_attention_heads for _, h in replay)
    ):
        return Alignment(tuple(i for i, _ in replay), tuple(h for _, h in replay), "pruning record")
    layers = evenly_spaced(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return Alignment(tuple(layers), (None,) * len(layers), "evenly spaced")


def _structural(model: Model) -> list[dict]:
    keys = ("structure", "dropped", "kept_heads")
    return [
        {k: step[k] for k in keys if k in step}
        for step in model.provenance
        if step.get("step") == "pruned" and step.get("structure") in ("heads", "layers")
    ]


def _replay(teacher: Model, steps: list[dict]) -> list[tuple[int, tuple[int, ...] | None]] | None:
    """Apply head and layer removals to the teacher's (layer, heads) list; None if they do not fit."""
    heads = tuple(range(teacher.config.num_attention_heads))
    state = [(i, heads) for i in range(teacher.config.num_hidden_layers)]
    for step in steps:
        if step["structure"] == "layers":
            if any(not 0 <= i < len(state) for i in step.get("dropped", [])):
                return None
            state = [s for i, s in enumerate(state) if i not in set(step["dropped"])]
        else:
            kept = step.get("kept_heads")
            if kept is None or len(kept) != len(state):
                return None
            state = [(layer, tuple(h[k] for k in keep)) for (layer, h), keep in zip(state, kept)]
    return [(layer, None if h == heads else h) for layer, h in state]


__all__ = [
    "Alignment",
    "DistillError",
    "alignment",
    "check_pair",
    "evenly_spaced",
    "parse_sizes",
    "student_from_sizes",
    "student_from_teacher",
]
