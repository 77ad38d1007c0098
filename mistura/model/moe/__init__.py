"""Mixture-of-Experts layers: router -> experts -> combine."""

from mistura.model.moe.experts import GroupedExperts
from mistura.model.moe.layer import MoEAux, MoELayer
from mistura.model.moe.moc import CollaborativeExperts
from mistura.model.moe.router import Router, Routing

__all__ = ["CollaborativeExperts", "GroupedExperts", "MoEAux", "MoELayer", "Router", "Routing"]
