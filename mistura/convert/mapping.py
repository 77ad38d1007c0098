"""A name table expanded for one model and read in both directions, one tensor at a time.

A name table (see `families.registry`) maps Hugging Face names to mistura names, with `{i}` for
the layer and `{e}` for the expert. `TensorMap.build` expands it for one mistura module
and keeps the entries whose targets the module has. The map then answers, per tensor:

- `hf_shape(hf_name)`: the shape the Hugging Face tensor must have;
- `ours(name, read)`: a mistura tensor built from Hugging Face's: renamed, transposed where
  stored (in, out), its rows reordered where the two sides order them differently, cut out
  of a fused tensor, or stacked from one tensor per expert;
- `theirs(hf_name, read)`: the inverse, a Hugging Face tensor built from mistura's;

where `read(name, index)` returns one stored tensor of the other side, or with an index
only that slice of it (one expert of a stacked tensor). Going through `read` keeps
conversions streaming: only the tensors in use are ever loaded. The shapes come from the
module, which may live on the meta device, so they cannot drift from the model code.

Two things depend on the config rather than on the table. A row order permutes the rows
of a Hugging Face tensor (of its (out, in) form) named by a template: mistura's tensor is
`hf[rows]`, and export writes `ours[argsort(rows)]`; DeepSeek-V3 checkpoints pair their
rotary channels otherwise than mistura (see `families.deepseek_v3`). And stored tensors under a
passed-over prefix, modules that mistura does not run, are neither expected nor refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mistura.errors import CheckpointError, ConfigError

Names = dict[str, str | tuple[str, ...]]  # HF template -> mistura template(s)
Shapes = dict[str, tuple[int, ...]]
Read = Callable[[str, int | None], torch.Tensor]  # (name, slice index or None) -> stored tensor


class Rule(NamedTuple):
    """Where one concrete Hugging Face tensor goes."""

    targets: tuple[str, ...]  # the mistura tensors it holds, in order along dim 0
    expert: int | None  # with `{e}`: the slice of the stacked targets it fills
    transposed: bool  # stored (in, out), the transpose of nn.Linear
    rows: torch.Tensor | None  # mistura's order of its rows (of the (out, in) form): ours = hf[rows]


@dataclass(frozen=True)
class TensorMap:
    rules: dict[str, Rule]  # every Hugging Face tensor the module needs, by name
    shapes: Shapes  # the mistura tensors a checkpoint stores: parameters (a tied one once), persistent buffers
    feeds: dict[str, tuple[str, ...]]  # mistura name -> the Hugging Face tensors it comes from, in expert order
    tied: dict[str, str]  # alias -> owner, e.g. a tied lm_head.weight -> tok_emb.weight
    skipped: frozenset[str]  # Hugging Face names passed over: stored copies of tied parameters, mask buffers
    passed_over: tuple[str, ...]  # prefixes of Hugging Face names passed over: modules that mistura does not run

    @classmethod
    def build(
        cls,
        module: nn.Module,
        names: Names,
        *,
        n_layer: int = 0,
        n_experts: int = 0,
        transposed: frozenset[str] = frozenset(),
        ignored: tuple[str, ...] = (),
        rows: dict[str, torch.Tensor] | None = None,
        passed_over: tuple[str, ...] = (),
        source: str = "the checkpoint",
    ) -> TensorMap:
        """The table `names` expanded over n_layer layers and n_experts experts for `module`.

        `transposed` lists the templates stored as (in, out), `ignored` those of buffers
        that hold no weights, `rows` the row order of templates whose rows mistura orders
        otherwise, `passed_over` the name prefixes of stored modules that import leaves
        out. A parameter of `module` that no entry fills raises
        ConfigError (an adaptive norm's alpha has no Hugging Face counterpart); a
        persistent buffer may go without (the router's selection bias, see `unfed`).
        """
        shapes, tied, buffers = _expected_shapes(module)
        expanded = _expand(names, n_layer, n_experts, transposed, rows or {})
        rules = {hf: rule for hf, rule in expanded.items() if all(t in shapes for t in rule.targets)}
        feeds: dict[str, list[str]] = {}
        for hf_name, rule in rules.items():  # `_expand` lists the experts in order
            for target in rule.targets:
                feeds.setdefault(target, []).append(hf_name)
        unfilled = [name for name in shapes if name not in feeds and name not in buffers]
        if unfilled:
            raise ConfigError(f"the config has parameters with no source in {source}: {some(unfilled)}")
        skipped = {hf for hf, rule in expanded.items() if all(t in tied for t in rule.targets)}
        skipped |= {name.format(i=i) for name in ignored for i in range(n_layer)}
        return cls(rules, shapes, {t: tuple(hf) for t, hf in feeds.items()}, tied, frozenset(skipped), passed_over)

    @property
    def unfed(self) -> list[str]:
        """Buffers that no Hugging Face tensor holds: zero on import, and they must be zero to export."""
        return [name for name in self.shapes if name not in self.feeds]

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        rule = self.rules[hf_name]
        parts = [self._part_shape(target, rule) for target in rule.targets]
        shape = (sum(part[0] for part in parts), *parts[0][1:])
        return shape[::-1] if rule.transposed else shape

    def check(self, stored: Shapes) -> None:
        """Stored Hugging Face names and shapes against the map: CheckpointError names a missing,
        unexpected or mis-shaped tensor."""
        missing = [name for name in self.rules if name not in stored]
        if missing:
            raise CheckpointError(
                f"the checkpoint is missing {some(missing)} (the source of {', '.join(self.rules[missing[0]].targets)})"
            )
        extra = sorted(
            name
            for name in stored
            if name not in self.rules and name not in self.skipped and not name.startswith(self.passed_over)
        )
        if extra:
            raise CheckpointError(
                f"the checkpoint has unexpected tensors {some(extra)} "
                "(a different architecture, or a config.json that does not match the weights?)"
            )
        for name, rule in self.rules.items():
            if tuple(stored[name]) != self.hf_shape(name):
                raise CheckpointError(
                    f"{name}: shape {tuple(stored[name])} in the checkpoint, "
                    f"expected {self.hf_shape(name)} for {', '.join(rule.targets)}"
                )

    def ours(self, name: str, read: Read) -> torch.Tensor:
        """Mistura tensor `name` from the Hugging Face tensors `read` returns; an unfed buffer is zero (fp32)."""
        if name not in self.feeds:
            return torch.zeros(self.shapes[name])
        parts = [self._cut(hf_name, name, read(hf_name, None)) for hf_name in self.feeds[name]]
        return parts[0] if self.rules[self.feeds[name][0]].expert is None else torch.stack(parts)

    def theirs(self, hf_name: str, read: Read) -> torch.Tensor:
        """Hugging Face tensor `hf_name` from the mistura tensors `read` returns (an expert's slice alone)."""
        rule = self.rules[hf_name]
        tensor = torch.cat([read(target, rule.expert) for target in rule.targets])
        if rule.rows is not None:
            tensor = tensor[rule.rows.argsort()]  # the inverse permutation
        return (tensor.t() if rule.transposed else tensor).contiguous()

    def hf_names(self) -> list[str]:
        """The Hugging Face tensors in the order of the mistura tensors they come from: layer by layer."""
        position = {name: i for i, name in enumerate(self.shapes)}
        return sorted(self.rules, key=lambda hf_name: position[self.rules[hf_name].targets[0]])

    def _part_shape(self, target: str, rule: Rule) -> tuple[int, ...]:
        """The shape of `target`'s part of a Hugging Face tensor: an expert's lacks the stacking dimension."""
        shape = self.shapes[target]
        return shape if rule.expert is None else shape[1:]

    def _cut(self, hf_name: str, target: str, tensor: torch.Tensor) -> torch.Tensor:
        """`target`'s rows of a Hugging Face tensor, turned (out, in) if stored (in, out), in mistura's row order."""
        rule = self.rules[hf_name]
        if rule.transposed:
            tensor = tensor.t()
        if rule.rows is not None:
            tensor = tensor[rule.rows]
        rows = [self._part_shape(t, rule)[0] for t in rule.targets]
        at = rule.targets.index(target)
        return tensor.narrow(0, sum(rows[:at]), rows[at]).contiguous()


def _expected_shapes(module: nn.Module) -> tuple[Shapes, dict[str, str], set[str]]:
    """The shapes of what a checkpoint of `module` stores, in state-dict order (a tied parameter
    once, under its first name), the tied names (alias -> owner), and which names are buffers."""
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied[name] = owners[id(param)]
        else:
            owners[id(param)] = name
    state = module.state_dict(keep_vars=True)
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items() if name not in tied}
    parameters = set(owners.values())
    return shapes, tied, {name for name in shapes if name not in parameters}


def _expand(
    names: Names, n_layer: int, n_experts: int, transposed: frozenset[str], rows: dict[str, torch.Tensor]
) -> dict[str, Rule]:
    """The table with `{i}` and `{e}` replaced by every layer and expert index: concrete HF name -> Rule."""
    rules: dict[str, Rule] = {}
    for template, ours in names.items():
        targets = (ours,) if isinstance(ours, str) else ours
        for i in range(n_layer) if "{i}" in template else (0,):
            for e in range(n_experts) if "{e}" in template else (None,):
                rules[template.format(i=i, e=e)] = Rule(
                    tuple(t.format(i=i) for t in targets), e, template in transposed, rows.get(template)
                )
    return rules


def some(names: list[str], shown: int = 3) -> str:
    """The first few names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
