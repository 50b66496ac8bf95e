"""Recipes: datasets and entry points for each stage."""
