"""Thin adapters from training frameworks to the Monitor (import the one you use:
``probescope.integrations.lightning``)."""
