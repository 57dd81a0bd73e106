"""Deployment tooling beside the Prometheus and Grafana configs: the Docker engine and image
helpers (docker_engine, docker_images), the dashboard renderer (render_dashboard) and the static
checks (check_deploy.sh). Run from the repository root, e.g. ``python -m deploy.docker_engine``.
"""
