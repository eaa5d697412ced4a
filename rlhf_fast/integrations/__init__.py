"""Glue to model libraries; each submodule imports its library lazily."""
