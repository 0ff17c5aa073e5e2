"""Personas: one YAML file per persona, routed by dialled number, validated for the people who write them."""

from agent.personas.numbers import normalize_number
from agent.personas.registry import PersonaRegistry, load_persona_dir
from agent.personas.schema import Persona, PersonaError

__all__ = ["Persona", "PersonaError", "PersonaRegistry", "load_persona_dir", "normalize_number"]
