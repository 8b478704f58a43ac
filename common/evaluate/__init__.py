"""Evaluation: JSON and free-text metrics, the eval command and its reports."""
