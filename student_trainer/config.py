"""A training run's settings, one validated object (no torch needed to read or check them: a sweep plans its
points without importing torch)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from darkstore.modelspec import ModelSpec


class TrainConfig(BaseModel):
    """Flat, commented defaults (the nanoGPT habit)."""

    model_config = ConfigDict(extra="forbid")
    student: ModelSpec
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft term; 0 = hard labels only")
    loss: Literal["kl", "mse", "ce", "hint", "reverse_kl", "jsd"] = Field(
        "kl", description="the objective (student_trainer.objectives): kl = Hinton's KD against the stored targets; "
        "mse = logit matching (dense stores); ce = hard labels only; hint = FitNets: hint_epochs regressing "
        "student_layer onto the stored hint_layer, then epochs of kl; reverse_kl, jsd = KL(q ‖ p) or the "
        "Jensen-Shannon divergence instead of KL(p ‖ q) (sequence stores: student_trainer.token_losses)")
    hint_layer: str | None = Field(None, description="hint: the stored teacher layer, TEACHER:LAYER (default: the "
                                   "store's only one)")
    student_layer: str | None = Field(None, description="hint: the student module it guides (a name from "
                                      "named_modules(), e.g. features.3)")
    hint_epochs: int = Field(0, ge=0, description="hint: epochs of the hint stage, before the epochs of KD")
    topk_loss: Literal["bucket", "spread"] = Field(
        "bucket", description="top-k stores: KL over the head and one 'other' bucket (no assumption about the "
        "tail), or the tail spread evenly over the classes left out and the dense KL")
    epochs: int = Field(30, ge=1, description="epochs of training (after a hint stage's)")
    batch_size: int = Field(128, ge=1, description="rows per step")
    lr: float = Field(1e-3, gt=0, description="the peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (decay says on which parameters)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum 0.9")
    schedule: Literal["cosine", "linear", "step", "constant"] = Field(
        "cosine", description="the learning rate per step after the warm-up (step: ×0.1 at ½ and ¾)")
    # the optimiser's finer settings; None: the row kind's default (OPTIMISER_DEFAULTS)
    max_grad_norm: float | None = Field(None, ge=0, description="clip the gradients' total norm to this before "
                                        "each step (0: no clipping). Default: 0 for classes, 1.0 for language models")
    betas: tuple[float, float] | None = Field(None, description="AdamW's (β1, β2). Default: (0.9, 0.999) for "
                                              "classes, (0.9, 0.95) for language models")
    decay: Literal["all", "matrices"] | None = Field(
        None, description="the parameters weight_decay applies to: all, or matrices only (weights and embeddings; "
        "not biases or norms' gains). Default: all for classes, matrices for language models")
    lr_floor: float | None = Field(None, ge=0, le=1, description="where the cosine or linear schedule ends, a "
                                   "fraction of lr. Default: 0 for classes, 0.1 for language models")
    warmup: float = Field(0.0, ge=0, lt=1, description="fraction of all steps spent warming the LR up linearly")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision (fp16 needs CUDA)")
    seed: int = Field(0, description="the student's initialisation, the batches' order and its random draws")
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction of store rows held out when no eval store is given")
    device: str = Field("cpu", description="cpu | cuda | cuda:N (under torchrun: each rank its own GPU)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes streaming the store")
    shuffle_buffer_mb: float = Field(256.0, gt=0, description="MiB of targets shuffled together (the window; up to "
                                     "three windows are in memory with read-ahead). Whole small stores shuffle at once")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's own choice)")
    views_per_epoch: int | None = Field(None, ge=1, description="views store: random views of each sample per "
                                                              "epoch (None: all K)")
    view_targets: Literal["matched", "clean"] = Field(
        "matched", description="views store: each view's own targets, or (an ablation: the stale-target "
                               "baseline) its sample's clean-view targets")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: at epoch ends only)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (bit-exact reruns)")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas(cls, v):
        """``0.9,0.95`` as the command line writes it."""
        return tuple(float(b) for b in v.split(",")) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _hint_options(self) -> "TrainConfig":
        if self.loss == "hint":
            if not self.student_layer:
                raise ValueError("loss hint needs student_layer: the student module the teacher's layer guides")
            if self.hint_epochs < 1:
                raise ValueError("loss hint needs hint_epochs >= 1 (the hint stage's epochs, before KD)")
        elif self.hint_layer or self.student_layer or self.hint_epochs:
            raise ValueError(f"hint_layer, student_layer and hint_epochs belong to loss hint, not {self.loss}")
        return self

    @property
    def total_epochs(self) -> int:
        return self.hint_epochs + self.epochs

    def with_defaults(self, defaults: dict[str, object]) -> "TrainConfig":
        """The settings with every unset optimiser setting (None) given its row kind's default."""
        return self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})


#: the optimiser settings of a class student where the run leaves them unset (torch's AdamW, no clipping)
CLASS_OPTIMISER = {"max_grad_norm": 0.0, "betas": (0.9, 0.999), "decay": "all", "lr_floor": 0.0}
#: a language-model student's: the usual recipe of language-model training (GPT-2/nanoGPT's), chosen by
#: bench/lm_students.py --parts recipe (docs/language-models.md gives the figures)
TOKEN_OPTIMISER = {"max_grad_norm": 1.0, "betas": (0.9, 0.95), "decay": "matrices", "lr_floor": 0.1}


#: settings that are each student's own: students that differ only in these see the same batches and can train
#: together from one read of the store (a sweep over them shares batches; one over seed, batch size, epochs,
#: holdout or the shuffle window does not)
PER_STUDENT = frozenset({"student", "temperature", "alpha", "loss", "hint_layer", "student_layer", "topk_loss", "lr",
                         "weight_decay", "optimizer", "schedule", "warmup", "amp", "hint_epochs", "epochs"})


def batch_key(config: TrainConfig) -> str:
    """What decides a run's batches (and the loop around them): equal keys can train together. Whether they
    do also depends on the store (an objective that reads teacher features or members widens the shuffle
    window): :func:`together` makes the final split."""
    shared = {k: v for k, v in config.model_dump(mode="json").items() if k not in PER_STUDENT}
    return json.dumps({**shared, "total_epochs": config.total_epochs}, sort_keys=True)


def unused_settings(config: TrainConfig) -> frozenset[str]:
    """Settings that cannot change what this run computes: hard labels alone (``ce``, or α = 0) read no
    targets, so T, α (for ``ce``) and the top-k loss do nothing; logit matching (``mse``) has no temperature."""
    if config.loss == "ce":
        return frozenset({"temperature", "alpha", "topk_loss"})
    if config.alpha == 0:
        return frozenset({"temperature", "topk_loss"})
    if config.loss == "mse":
        return frozenset({"temperature", "topk_loss"})
    return frozenset()


def effect_key(config: TrainConfig) -> str:
    """Equal for two configs that train the same run (they differ only in :func:`unused_settings`)."""
    unused = unused_settings(config)
    return json.dumps({k: (None if k in unused else v) for k, v in config.model_dump(mode="json").items()},
                      sort_keys=True)

