"""A seeded synthetic shop: raw events, items and users files, and optionally its true purchase odds."""

from propensity.demo.batch import EVENT_TYPES
from propensity.demo.config import Behaviour, DemoDataConfig, DemoDataSummary
from propensity.demo.generator import generate_demo_data
from propensity.demo.writer import EVENTS_SCHEMA

__all__ = ["EVENTS_SCHEMA", "EVENT_TYPES", "Behaviour", "DemoDataConfig", "DemoDataSummary", "generate_demo_data"]
