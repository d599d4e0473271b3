"""Students made from the teacher, and how their layers and heads line up with the teacher's."""

import copy

import pytest
import torch
from helpers import random_tiny, tiny_config, tiny_tokenizer

from tuili.distill import (
    DistillError,
    alignment,
    check_pair,
    student_from_sizes,
    student_from_teacher,
)
from tuili.distill.students import evenly_spaced, parse_sizes
from tuili.models import LlamaForCausalLM, Model


def deeper_tiny(layers=4):
    torch.manual_seed(0)
    config = tiny_config()
    config.num_hidden_layers = layers
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return Model(module, tiny_tokenizer(), config, "random:deep")


CALIB = torch.randint(0, 259, (4, 24), generator=torch.Generator().manual_seed(1))


def test_pruned_heads_are_matched_to_the_teacher_heads_they_were():
    teacher = random_tiny()
    student = student_from_teacher(teacher, "heads=0.5", CALIB)
    align = alignment(teacher, student)
    assert align.source == "pruning record" and align.layers == (0, 1)
    ids = CALIB[:1]
    t_attn = teacher.module(ids, output_attentions=True).attentions
    s_attn = student.module(ids, output_attentions=True).attentions
    # layer 0 sees the same embeddings in both: a kept head attends exactly as the teacher head it was
    torch.testing.assert_close(s_attn[0], t_attn[0][:, list(align.heads[0])])


def test_dropped_layers_map_each_student_layer_to_its_teacher_layer():
    teacher = deeper_tiny(4)
    student = student_from_teacher(teacher, {"layers": 2}, CALIB)
    dropped = student.provenance[-1]["dropped"]
    align = alignment(teacher, student)
    assert list(align.layers) == [i for i in range(4) if i not in dropped]
    assert align.heads == (None, None)


def test_heads_then_layers_replay_in_order():
    teacher = deeper_tiny(4)
    student = student_from_teacher(teacher, "heads=0.5,layers=1", CALIB)
    record = {s["structure"]: s for s in student.provenance if s.get("step") == "pruned"}
    align = alignment(teacher, student)
    kept_layers = [i for i in range(4) if i not in record["layers"]["dropped"]]
    assert list(align.layers) == kept_layers
    assert [list(h) for h in align.heads] == [record["heads"]["kept_heads"][i] for i in kept_layers]


def test_a_student_of_its_own_shape_or_unrelated_is_evenly_spaced():
    teacher = deeper_tiny(4)
    unrelated = deeper_tiny(2)
    align = alignment(teacher, unrelated)
    assert align.source == "evenly spaced" and align.layers == (1, 3)
    assert evenly_spaced(3, 30) == [9, 19, 29] and evenly_spaced(4, 4) == [0, 1, 2, 3]


def test_student_from_sizes_keeps_the_teachers_weights():
    teacher = deeper_tiny(4)
    student = student_from_sizes(teacher, num_hidden_layers=2, intermediate_size=48)
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (2, 48)
    assert alignment(teacher, student).layers == (1, 3)  # evenly spaced without calibration
    # each kept layer's attention weights are the teacher layer's, untouched
    for s_layer, t in zip(student.module.model.layers, (1, 3)):
        t_layer = teacher.module.model.layers[t]
        torch.testing.assert_close(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight)
    assert teacher.config.num_hidden_layers == 4  # the teacher itself is unchanged
    with_calib = student_from_sizes(teacher, num_hidden_layers=3, calib=CALIB)
    assert with_calib.provenance[-1]["block_influence"] is not None
    with pytest.raises(DistillError, match="1 to 4 layers"):
        student_from_sizes(teacher, num_hidden_layers=5)
    with pytest.raises(DistillError, match="MLP width"):
        student_from_sizes(teacher, intermediate_size=0)


def test_sizes_parse_and_refuse_nonsense():
    assert parse_sizes("layers=16,mlp=768") == {"num_hidden_layers": 16, "intermediate_size": 768}
    with pytest.raises(DistillError, match="layers=N,mlp=M"):
        parse_sizes("layers=half")


def test_mismatched_vocabularies_are_refused():
    teacher = random_tiny()
    check_pair(teacher, student_from_teacher(teacher, "mlp=0.5", CALIB))
    other = copy.deepcopy(teacher)
    other.config.vocab_size = 300
    with pytest.raises(DistillError, match="259 vocabulary entries and the student 300"):
        check_pair(teacher, other)
    shuffled = copy.deepcopy(teacher)
    shuffled.tokenizer.backend.add_tokens(["<extra>"])
    shuffled.config.vocab_size = teacher.config.vocab_size
    with pytest.raises(DistillError, match="different ids"):
        check_pair(teacher, shuffled)
