"""Manifests and scripts that run a job where the users run: Kubernetes (``k8s``).

Everything here is a pure function of a job spec and a few sizes; nothing talks to a
cluster. ``cube-engine deploy`` (``engine/_cli/deploy.py``) writes what these return.
"""
