"""Cookiecutter hooks of the template; ``hooks.answers`` also serves as a Jinja extension."""
