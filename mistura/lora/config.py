"""What a LoRA adapter is: its rank, scaling, dropout and the layers it adapts.

Each adapted layer computes y = W x + s B A dropout(x), with A (r, in) and B (out, r),
where s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023: the update's size
then stays put as r grows). B starts at zero, so an adapted model starts equal to its base.

Targets are patterns over module names, fnmatch-style (`*` matches any characters, dots
included): `blocks.*.attn.q_proj`, or with no dot a module's last name alone, as PEFT's
target_modules (`q_proj`). A group name stands for its patterns (`GROUPS`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from mistura.errors import ConfigError
from mistura.fields import from_dict

# Named sets of targets. Dense MLPs and shared experts name their projections alike;
# their places (`mlp.*` in a dense layer, `mlp.shared.*` in a MoE layer) tell them apart.
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("blocks.*.attn.*",),  # q/k/v/o, and MLA's q_proj or q_a/q_b, kv_a, kv_b, o
    "mlp": ("blocks.*.mlp.gate_proj", "blocks.*.mlp.up_proj", "blocks.*.mlp.down_proj"),
    "shared": ("blocks.*.mlp.shared.*",),
    "experts": ("blocks.*.mlp.experts",),  # every routed expert, one A/B pair per expert
}
GROUPS["all-linear"] = GROUPS["attention"] + GROUPS["mlp"] + GROUPS["shared"]
GROUPS["all"] = GROUPS["all-linear"] + GROUPS["experts"]


@dataclass(frozen=True)
class LoRAConfig:
    """A LoRA recipe; an adapter's adapter_config.json keeps it under `lora`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank
    targets: tuple[str, ...] = ("all-linear",)

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"lora.targets is empty: name layers or groups ({', '.join(GROUPS)})")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """s in y = W x + s B A x."""
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "lora") -> LoRAConfig:
        return from_dict(cls, data, where)

    def select(self, names: list[str]) -> list[str]:
        """The names that the targets match, in the given order; ConfigError for a target that matches none."""
        chosen = set()
        for target in self.targets:
            matched = {name for name in names if any(_matches(name, p) for p in GROUPS.get(target, (target,)))}
            if not matched:
                raise ConfigError(
                    f"LoRA target {target!r} matches no layer of this model; groups: {', '.join(GROUPS)}; "
                    f"layers: {_summary(names)}"
                )
            chosen |= matched
        return [name for name in names if name in chosen]


def _matches(name: str, pattern: str) -> bool:
    """fnmatch over the whole name, or over its last part for a pattern with no dot."""
    return fnmatch.fnmatchcase(name if "." in pattern else name.rpartition(".")[2], pattern)


def _summary(names: list[str]) -> str:
    """The names with layer indices folded into `*`: blocks.*.attn.q_proj, ..."""
    folded = dict.fromkeys(".".join("*" if part.isdigit() else part for part in name.split(".")) for name in names)
    return ", ".join(folded) or "none"
