"""Run under torchrun by test_trainer: distil a tiny student on N processes and save its weights."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from helpers import random_tiny

from tuili.distill import DistillConfig, Distiller, student_from_teacher

CALIB = torch.randint(0, 259, (4, 24), generator=torch.Generator().manual_seed(1))
TRAIN = torch.randint(0, 259, (16, 24), generator=torch.Generator().manual_seed(2))


def config(batch_size: int) -> DistillConfig:
    return DistillConfig(
        steps=3,
        lr=1e-2,
        warmup_steps=1,
        batch_size=batch_size,
        grad_accum=2,
        alpha=0.7,
        temperature=2.0,
        hidden_loss="mse",
        attention_loss="kl",
        bf16=False,
        eval_every=0,
        checkpoint_every=0,
    )


def trained(batch_size: int):
    teacher = random_tiny()
    student = student_from_teacher(teacher, "mlp=0.5,layers=1", CALIB)
    trainer = Distiller(teacher, student, TRAIN, config(batch_size), progress=False)
    trainer.train()
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = trained(batch_size=2)
    if trainer.rank == 0:
        torch.save(
            {
                "student": trainer.student.module.state_dict(),
                "world": trainer.world,
                "losses": [row["loss"] for row in trainer.log],
            },
            sys.argv[1],
        )
